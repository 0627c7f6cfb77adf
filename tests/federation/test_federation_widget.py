"""The napari Federation widget joins a real TLS federation, trains a round, and leaves;
it gives up on a coordinator nobody answers for, and words the lab's history for people."""

from __future__ import annotations

import json

import pytest

from napari_feddp.federation.certs import create_node_keys, create_pilot_pki
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.pilot import LocalFederation
from napari_feddp.federation.processes import find_free_port
from napari_feddp.widgets import ERROR_COLOR
from napari_feddp.widgets import federation as federation_widget
from napari_feddp.widgets.federation import FederationWidget

from .conftest import tiny_settings, wait_no_processes

pytestmark = pytest.mark.slow  # real Flower processes


@pytest.mark.slow
def test_widget_joins_trains_and_leaves(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = FederationWidget(viewer)
    viewer.window.add_dock_widget(widget)
    data = make_synthetic_lab(tmp_path / "lab-data", n_tiles=4, size=32, seed=3)
    with LocalFederation(workdir=tmp_path / "fed", labs=[]) as federation:
        federation.register("widgetlab")
        keys = federation.lab_keys["widgetlab"]
        widget.superlink.value = federation.coordinator.fleet_address
        widget.ca.value = str(federation.pki.ca.cert)
        widget.key.value = str(keys.private_key)
        widget.dataset.value = str(data)
        widget.budget.value = 50.0
        assert widget.join(), widget.status.value
        assert not widget.join_button.enabled and widget.leave_button.enabled
        qtbot.waitUntil(lambda: widget.status.value.startswith("waiting for the next round"), timeout=120_000)
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


@pytest.mark.slow
def test_widget_gives_up_on_an_unreachable_coordinator_and_stops_the_node(
        make_napari_viewer, qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr(federation_widget, "CONNECT_TIMEOUT", 3.0)
    pki = create_pilot_pki(tmp_path / "pki")
    keys = create_node_keys(tmp_path / "keys", "lab-a")
    address = f"127.0.0.1:{find_free_port()}"  # nothing listens there
    viewer = make_napari_viewer()
    widget = FederationWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.superlink.value = address
    widget.ca.value, widget.key.value = str(pki.ca.cert), str(keys.private_key)
    widget.dataset.value = str(make_synthetic_lab(tmp_path / "data", n_tiles=2, size=32))
    assert widget.join(), widget.status.value
    workdir = str(widget.node.workdir)
    assert widget.status.value == f"connecting to {address}…"
    qtbot.waitUntil(lambda: widget.node is None, timeout=60_000)
    assert widget.status.value.startswith(f"cannot reach coordinator at {address} (no connection after ")
    assert "\x1b" not in widget.status.value
    assert ERROR_COLOR in widget.status.native.styleSheet()
    assert widget.join_button.enabled and not widget.leave_button.enabled
    assert wait_no_processes(workdir) == []


@pytest.mark.parametrize(
    ("rows", "text"),
    [
        ([], "waiting for the next round"),
        ([{"event": "training", "round": 3}], "round 3: training"),
        ([{"event": "trained", "round": 3, "train-loss": 0.5, "train-dice": 0.6, "epsilon": 7.2},
          {"event": "declined", "round": 4, "reason": "next round would reach epsilon 9.0 > budget 8.0",
           "epsilon": 7.2, "epsilon-next": 9.0, "epsilon-max": 8.0}],
         "round 4: declined - next round would reach epsilon 9.0 > budget 8.0"),
        ([{"event": "evaluating", "round": 5, "final": True},
          {"event": "model-promoted", "round": 5, "reason": "Dice 0.81 >= 0.80 - 0.02"},
          {"event": "evaluated", "round": 5, "final": True}],
         "run finished (round 5); the final model became this lab's default model: Dice 0.81 >= 0.80 - 0.02"),
        ([{"event": "evaluating", "round": 5, "final": True},
          {"event": "model-refused", "round": 5, "reason": "Dice 0.10 < 0.90 - 0.02"},
          {"event": "evaluated", "round": 5, "final": True}],
         "run finished (round 5); the final model was not adopted: Dice 0.10 < 0.90 - 0.02"),
        ([{"event": "refused-app", "reason": "the app bundle has files of its own (evil.py)"}],
         "refused a run: its app bundle is not this lab's napari-feddp (the app bundle has files of its own "
         "(evil.py))"),
    ],
)
def test_the_status_line_words_the_labs_history(make_napari_viewer, joined_lab, rows, text):
    widget = FederationWidget(make_napari_viewer())
    widget.node = joined_lab
    joined_lab.history_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    widget.refresh()
    assert widget.status.value == text
    assert widget.status.native.wordWrap()
    alarming = rows and rows[-1]["event"] == "refused-app"
    assert (ERROR_COLOR in widget.status.native.styleSheet()) == bool(alarming)
    assert widget.node is joined_lab  # the node still runs: it waits for the next run
    if rows and rows[0]["event"] == "trained":
        assert widget.plot.values["epsilon"] == [7.2] and widget.plot.values["train-loss"] == [0.5]


def test_a_finished_run_and_a_decline_are_also_notifications(make_napari_viewer, joined_lab):
    from napari.utils.notifications import notification_manager

    widget = FederationWidget(make_napari_viewer())
    widget.node = joined_lab
    joined_lab.history_file.write_text(json.dumps(
        {"event": "declined", "round": 2, "reason": "next round would reach epsilon 9.0 > budget 8.0"}) + "\n")
    seen = len(notification_manager.records)
    widget.refresh()
    widget.refresh()  # the same status again is not announced twice
    messages = [n.message for n in notification_manager.records[seen:]]
    assert messages == ["Federation: round 2: declined - next round would reach epsilon 9.0 > budget 8.0"]


def test_the_budget_defaults_to_8_and_0_is_warned_about(make_napari_viewer):
    widget = FederationWidget(make_napari_viewer())
    warning = widget.budget_warning.native  # isHidden: the viewer, hence the dock, is not shown in tests
    assert widget.budget.value == 8.0 and warning.isHidden()
    widget.budget.value = 0.0
    assert not warning.isHidden() and "UNLIMITED" in widget.budget_warning.value
    assert ERROR_COLOR in warning.styleSheet() and "epsilon budget unlimited" in widget.policy.value
    widget.budget.value = 2.0
    assert warning.isHidden() and "epsilon budget 2 " in widget.policy.value
    labelled = [w for w in widget if not isinstance(w, federation_widget.PushButton)]
    assert all(w.label for w in labelled)  # every field says what it is
