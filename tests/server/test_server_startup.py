"""Start-up refuses settings it cannot honour, with the fix in the message (issue 11, item 5): an
explicit HEST_METER that cannot be read, or a misspelt one, once fell back to the estimate
meter silently. A real `python -m server` process; it must exit before loading the model."""

from __future__ import annotations

import pytest
from server_helpers import ServerProcess

from hest_core.energy.meters import NvmlMeter


def _nvml_readable() -> bool:
    try:
        NvmlMeter()
        return True
    except Exception:
        return False


@pytest.mark.parametrize(
    "meter,says",
    [
        ("nvlm", "HEST_METER"),  # misspelt: pydantic names the variable and the choices
        pytest.param(
            "nvml",
            "nvidia-ml-py",
            marks=pytest.mark.skipif(_nvml_readable(), reason="NVML is readable here"),
        ),
    ],
)
def test_explicit_meter_that_cannot_be_read_stops_the_server(tmp_path, meter, says) -> None:
    server = ServerProcess({"HEST_MODEL": "tiny:llama", "HEST_METER": meter}, tmp_path / "log")
    rc = server.proc.wait(timeout=120)
    log = server.tail()
    assert rc == 2, log
    assert says in log and "ready" not in log, log
