"""Tests for napari_feddp.models."""
