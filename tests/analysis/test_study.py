from __future__ import annotations

import pytest

from expertsim.analysis.study import expand, load_study, normalise_config, run_id
from expertsim.errors import ConfigError

from .conftest import ERROR_VARIANTS, SMALL_STUDY, write_study


def test_grid_product_and_fixed_cache_policies_run_once(tmp_path):
    study = load_study(write_study(tmp_path))
    # lru: 2 bandwidths x 3 caches; no-cache fixes its own cache: once per bandwidth.
    assert len(study) == 2 * 3 + 2
    assert len(set(study.run_ids)) == len(study)
    nocache = [c for c in study.runs if c["policy"] == "no-cache"]
    assert len(nocache) == 2 and all("cache_per_layer" not in c for c in nocache)
    assert sorted({c["link.bandwidth_gbps"] for c in study.runs}) == [16, 64]
    assert study.baseline == "no-cache"
    assert study.swept_keys == ["cache_per_layer", "link.bandwidth_gbps", "policy"]


def test_variants_cross_the_grid(tmp_path):
    study = load_study(write_study(tmp_path, SMALL_STUDY + ERROR_VARIANTS))
    assert len(study) == 2 * (2 * 3 + 2)
    assert {c.get("gpu.memory_gb") for c in study.runs} == {None, 8}
    assert {c["label"] for c in study.runs} == {"80 GB", "8 GB"}


def test_run_id_is_stable_and_ignores_bookkeeping():
    a = normalise_config({"policy": "lru", "cache_per_layer": 2})
    b = normalise_config({"cache_per_layer": 2, "policy": {"name": "lru"}})
    assert run_id(a) == run_id(b)
    assert run_id(a) != run_id(normalise_config({"policy": "lru", "cache_per_layer": 3}))
    assert run_id(a) == run_id({**a, "timeline": True, "trace_path": "/elsewhere/x.parquet"})
    assert len(run_id(a)) == 16


def test_policy_table_gives_parameters():
    c = normalise_config({"policy": {"name": "lru", "x": 1}, "cache_slots": 10})
    assert c["policy"] == "lru" and c["policy_params"] == {"x": 1}


@pytest.mark.parametrize("raw, match", [
    ({"cache_per_layer": 2, "cache_slots": 3}, "more than one cache size"),
    ({"cache_pre_layer": 2}, "unknown key 'cache_pre_layer'"),
    ({"cache_gb": -1}, "non-negative"),
    ({"batch": 0}, "batch"),
    ({"trace": "no-such-trace.parquet"}, "not found"),
    ({"policy": 3}, "policy must be"),
])
def test_bad_run_keys_name_the_problem(raw, match):
    with pytest.raises(ConfigError, match=match):
        normalise_config(raw)


def test_bad_study_layout(tmp_path):
    with pytest.raises(ConfigError, match="non-empty list"):
        expand({"grid": {"policy": "lru"}})
    with pytest.raises(ConfigError, match="unknown top-level"):
        expand({"grids": {}})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study(write_study(tmp_path, "grid = ["))


def test_trace_relative_to_study_file(tmp_path):
    from expertsim.traces.io import write_trace
    from expertsim.traces.synth import default_trace

    write_trace(default_trace(num_requests=1, decode_tokens=4), tmp_path / "t.parquet")
    study = load_study(write_study(tmp_path, '[fixed]\ntrace = "t.parquet"\ncache_per_layer = 2\n'))
    (config,) = study.runs
    assert config["trace"] == "t.parquet"
    assert config["trace_path"] == str((tmp_path / "t.parquet").resolve())


def test_table_axis_sets_several_keys(tmp_path):
    text = ('[grid]\npolicy = ["lru"]\ncache = [{ cache_per_layer = "max" }, { cache_slots = 100 }]\n'
            '"link.bandwidth_gbps" = [16, 32]\n')
    study = load_study(write_study(tmp_path, text))
    assert len(study) == 4
    assert sorted(str(c.get("cache_per_layer", c.get("cache_slots"))) for c in study.runs) == ["100", "100", "max", "max"]
    assert "cache" not in study.runs[0] and "cache_slots" in study.swept_keys
    with pytest.raises(ConfigError, match="unknown key 'cache_size'"):
        expand({"grid": {"cache": [{"cache_size": 1}]}})
