"""pytest plugin: one JSON line per test result in <junit path>.jsonl, written as the results
arrive (on the xdist controller only), so a run killed by its timeout still counts."""
import json
import os

_state = {}


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return
    xml = config.getoption("xmlpath", None) or "pytest"
    _state["path"] = os.path.splitext(xml)[0] + ".jsonl"


def pytest_runtest_logreport(report):
    path = _state.get("path")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "duration": round(report.duration, 3)}
    if report.outcome == "failed":
        rec["message"] = str(report.longrepr)[-800:]
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
