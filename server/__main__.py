"""`python -m server`: serve the configured model (default: SmolLM2-135M + default adapter).

Settings come from `HEST_*` env vars (see server/settings.py, docs/server.md). On SIGTERM/SIGINT
the server refuses new requests with 503, uvicorn stops accepting connections and waits for the
in-flight requests (up to HEST_DRAIN_TIMEOUT_S), then the lifespan drains the queue and exits.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from hest_core import MeterUnavailableError
from hest_core.config import ConfigError
from hest_core.energy.meters import pick_meter

from .app import create_app
from .serving import Serving
from .settings import Settings


class DrainingServer(uvicorn.Server):
    """A uvicorn server that tells the serving layer to refuse new work as soon as a signal
    arrives, before uvicorn's own graceful shutdown waits for open requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        serving: Serving = self.app.state.serving
        if not serving.draining:
            logging.getLogger("hest.server").info("signal %s: draining in-flight requests", sig)
        serving.begin_drain()
        super().handle_exit(sig, frame)


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as err:  # e.g. HEST_METER=nvlm: name the variable and the choices
        for e in err.errors():
            var = "HEST_" + "_".join(str(p) for p in e["loc"]).upper()
            what = f"{var}={e['input']!r}: " if e["loc"] else ""
            print(f"hest server: bad setting {what}{e['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("hest.server").info(
        "starting on http://%s:%d (model=%s adapter=%s device=%s policy=%s)",
        settings.host,
        settings.port,
        settings.model,
        settings.adapter,
        settings.device,
        settings.policy,
    )
    try:  # a bad runtime setting, or an explicit meter that cannot be read, stops it here
        runtime = settings.runtime_config()
        pick_meter(settings.device.split(":")[0], runtime.meter, runtime.nominal_watts)
    except (ConfigError, MeterUnavailableError) as err:
        logging.getLogger("hest.server").error("%s", err)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        lifespan="on",
    )
    server = DrainingServer(config, app)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
