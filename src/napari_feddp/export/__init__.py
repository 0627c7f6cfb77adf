"""Exports of segmentation results: pyramidal OME-TIFF label maps and QuPath GeoJSON."""

from .geojson import labels_to_features, nuclei_to_features, write_geojson, write_nuclei_geojson
from .ome_tiff import write_ome_labels

__all__ = ["labels_to_features", "nuclei_to_features", "write_geojson", "write_nuclei_geojson", "write_ome_labels"]
