"""The napari Federation widget joins a real TLS federation, trains a round, and leaves."""

from __future__ import annotations

import pytest

from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.pilot import LocalFederation
from napari_feddp.widgets.federation import FederationWidget

from .conftest import tiny_settings, wait_no_processes

pytestmark = pytest.mark.slow


def test_widget_joins_trains_and_leaves(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = FederationWidget(viewer)
    viewer.window.add_dock_widget(widget)
    data = make_synthetic_lab(tmp_path / "lab-data", n_tiles=4, size=32, seed=3)
    with LocalFederation(workdir=tmp_path / "fed", labs=[]) as federation:
        federation.register("widgetlab")
        keys = federation.lab_keys["widgetlab"]
        widget.superlink.value = federation.superlink.fleet_address
        widget.ca.value = str(federation.pki.ca.cert)
        widget.key.value = str(keys.private_key)
        widget.dataset.value = str(data)
        widget.budget.value = 50.0
        assert widget.join(), widget.status.value
        assert not widget.join_button.enabled and widget.leave_button.enabled
        qtbot.waitUntil(lambda: widget.status.value.startswith("waiting"), timeout=120_000)
        outcome = federation.run(tiny_settings(num_rounds=1, min_clients=1), timeout=300)
        assert outcome.summary is not None
        widget.refresh()
        assert len(widget.plot.values["epsilon"]) == 1 and widget.plot.values["epsilon"][0] > 0
        assert len(widget.plot.values["train-loss"]) == 1  # the curves read the keys the lab records
        assert "epsilon budget 50" in widget.policy.value
        node_workdir = str(widget.node.workdir)
        widget.leave()
        assert widget.join_button.enabled and not widget.leave_button.enabled
        assert wait_no_processes(node_workdir) == []


def test_widget_reports_bad_input_without_starting_anything(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    widget = FederationWidget(viewer)
    widget.dataset.value = str(tmp_path)
    assert not widget.join()
    assert widget.status.value.startswith("error: CA certificate")
    assert widget.node is None and widget.join_button.enabled
