"""One runtime configuration object (issue 12, item 4): `RuntimeConfig`, frozen, validated where
it is built, read from the environment in one place, `RuntimeConfig.from_env()`."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

from hest_core import Engine
from hest_core.config import DEFAULT_NOMINAL_WATTS, ENV, ConfigError, RuntimeConfig

HEST_CORE = Path(__file__).resolve().parents[2] / "hest_core"


def test_no_environment_reads_in_the_runtime_but_the_builder() -> None:
    """Every os.environ / os.getenv / environ read in hest_core is in config.py's from_env."""
    pattern = re.compile(r"\bos\.environ\b|\bgetenv\b|\bos\.putenv\b")
    hits = [
        f"{p.name}:{n}"
        for p in sorted(HEST_CORE.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and p.name != "config.py"
    ]
    assert hits == [], f"read the environment through RuntimeConfig.from_env(): {hits}"
    src = (HEST_CORE / "config.py").read_text()
    body = src[src.index("    def from_env(") :]
    body = body[: body.index("\ndef ")]
    assert src.count("os.environ") == body.count("os.environ") >= 1


def test_defaults_and_every_field_from_its_variable(tmp_path) -> None:
    assert RuntimeConfig.from_env({}) == RuntimeConfig()
    assert RuntimeConfig().nominal_watts == DEFAULT_NOMINAL_WATTS
    env = {
        "HEST_THREADS": "3",
        "HEST_COMPILE": "yes",
        "HEST_METER": "Estimate",
        "HEST_NOMINAL_WATTS": "45.5",
        "HEST_CALIBRATION": str(tmp_path / "t.json"),
        "HEST_CACHE_DIR": str(tmp_path),
        "HEST_FUSED": "0",
        "HEST_NATIVE": "0",
        "HEST_NATIVE_SANITIZE": "1",
        "CC": "clang",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        "HEST_PORT": "1",  # a server setting: not the runtime's
    }
    cfg = RuntimeConfig.from_env(env)
    assert cfg == RuntimeConfig(
        threads=3,
        compile=True,
        meter="estimate",
        nominal_watts=45.5,
        calibration=tmp_path / "t.json",
        cache_dir=tmp_path,
        fused=False,
        native=False,
        native_sanitize=True,
        cc="clang",
        onednn_max_isa="AVX512_CORE_BF16",
    )
    assert set(ENV) == {f for f in cfg.__dataclass_fields__}
    assert RuntimeConfig.from_env(env, threads=1).threads == 1  # overrides win
    assert RuntimeConfig.from_env({"HEST_THREADS": ""}).threads == 0  # empty = unset
    with pytest.raises(FrozenInstanceError):
        cfg.threads = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "var,value,says",
    [
        ("HEST_THREADS", "two", "integer >= 0"),
        ("HEST_THREADS", "-1", "integer >= 0"),
        ("HEST_COMPILE", "maybe", "one of 1, true, yes, on, 0, false, no, off"),
        ("HEST_FUSED", "2", "one of 1, true"),
        ("HEST_NATIVE", "nope", "one of 1, true"),
        ("HEST_METER", "nvlm", "one of auto, nvml, rapl, estimate"),
        ("HEST_NOMINAL_WATTS", "0", "finite number of watts > 0"),
        ("HEST_NOMINAL_WATTS", "inf", "finite number of watts > 0"),
        ("HEST_NOMINAL_WATTS", "30W", "finite number of watts > 0"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_allowed_values(var, value, says) -> None:
    with pytest.raises(ConfigError) as info:
        RuntimeConfig.from_env({var: value})
    assert info.value.message.startswith(f"{var}=") and says in info.value.message
    assert info.value.param == var


def test_validated_when_built_directly() -> None:
    with pytest.raises(ConfigError, match="HEST_THREADS"):
        RuntimeConfig(threads=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="HEST_FUSED"):
        replace(RuntimeConfig(), fused="0")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="HEST_CACHE_DIR"):
        RuntimeConfig(cache_dir="/tmp")  # type: ignore[arg-type]


def test_the_engine_runs_under_the_config_it_is_given(monkeypatch) -> None:
    monkeypatch.setenv("HEST_NOMINAL_WATTS", "not a number")  # ignored: a config is given
    cfg = RuntimeConfig.from_env(
        {k: v for k, v in __import__("os").environ.items() if k != "HEST_NOMINAL_WATTS"},
        meter="estimate",
        nominal_watts=77.0,
        fused=False,
    )
    eng = Engine.from_pretrained("tiny:llama", adapter=None, progress=False, config=cfg)
    assert eng.config is cfg and eng.meter.watts == 77.0 and eng._nominal_watts() == 77.0
    assert eng.lean.fused.enabled is False
    with pytest.raises(ConfigError, match="HEST_NOMINAL_WATTS='not a number'"):
        Engine.from_pretrained("tiny:llama", adapter=None, progress=False)


def test_process_wide_reads_ignore_other_variables(monkeypatch, tmp_path) -> None:
    """The cache directory and the kernels (process-wide, no engine at hand) read only their own
    variables: a bad HEST_THREADS fails the engine that uses it, not a cache lookup."""
    from hest_core.cachedirs import cache_dir

    monkeypatch.setenv("HEST_THREADS", "two")
    monkeypatch.setenv("HEST_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    assert RuntimeConfig.from_env(only=("fused",)) == RuntimeConfig()
