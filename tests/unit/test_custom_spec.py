"""The spec's custom model section: options as kwargs, a stable dump, and what the model hash covers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from fleetmpi import spec as specmod
from fleetmpi.errors import BadInput
from fleetmpi.schema import to_plain

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_model" / "poisson.yaml"


def _load(tmp_path: Path, model: dict[str, object], name: str = "s.yaml",
          sync: str = "exact") -> specmod.Spec:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["model"], raw["sync"] = model, {"kind": sync}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return specmod.load(path)


def test_example_loads_with_its_option_and_folder() -> None:
    m = specmod.load(EXAMPLE).model
    assert (m.kind, m.class_path, m.kwargs, m.l2) == ("custom", "poisson:PoissonRegression", {"full_nll": True}, 1e-4)
    assert m.path == str(EXAMPLE.parent.resolve())


def test_extra_keys_become_options_and_the_dump_reloads_the_same(tmp_path: Path) -> None:
    s = _load(tmp_path, {"kind": "custom", "class": "m:C", "l2": 0.5, "hidden": [7, 3], "alpha": {"a": [1, 2.5]},
                         "options": {"beta": "x"}})
    assert s.model.kwargs == {"hidden": [7, 3], "alpha": {"a": [1, 2.5]}, "beta": "x"} and s.model.hidden == ()
    dumped = yaml.safe_load(specmod.dump(s))["model"]
    assert dumped["class"] == "m:C" and dumped["alpha"] == {"a": [1, 2.5]} and "options" not in dumped
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "spec.yaml").write_text(specmod.dump(s))
    again = specmod.load(tmp_path / "job" / "spec.yaml")
    assert again.model == s.model
    assert again.spec_hash() == s.spec_hash()


def test_built_in_model_hash_is_unchanged_by_the_custom_fields(tmp_path: Path) -> None:
    s = _load(tmp_path, {"kind": "softmax", "l2": 0.25})
    legacy = {k: v for k, v in to_plain(s.model).items()
              if k not in ("class_path", "path", "options", "lags", "trend", "compute", *specmod.GP_KEYS,
                           *specmod.TREE_KEYS)}
    assert s.model_hash() == hashlib.sha256(json.dumps({"model": legacy}, sort_keys=True).encode()).hexdigest()
    assert "class" not in yaml.safe_load(specmod.dump(s))["model"]


def test_model_hash_covers_options_and_source_not_the_folder(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cm.py").write_text((EXAMPLE.parent / "poisson.py").read_text())
    base = {"kind": "custom", "class": "cm:PoissonRegression"}
    h_a = _load(tmp_path, {**base, "path": "a"}).model_hash()
    assert _load(tmp_path, {**base, "path": "b"}).model_hash() == h_a          # same source, other folder
    assert _load(tmp_path, {**base, "path": "a", "full_nll": True}).model_hash() != h_a
    assert _load(tmp_path, {**base, "path": "a"}).model.identity()["source_sha256"] == hashlib.sha256(
        (tmp_path / "a" / "cm.py").read_bytes()).hexdigest()


@pytest.mark.parametrize(("model", "needle"), [
    ({"kind": "custom"}, "model.class: kind custom needs class"),
    ({"kind": "custom", "class": "no_colon"}, "model.class: expected \"package.module:ClassName\""),
    ({"kind": "custom", "class": "m:C", "classes": 1}, "model.classes"),
    ({"kind": "custom", "class": "m:C", "l2": 1, "options": {"l2": 2}}, "model.l2: l2 is passed by fleetmpi"),
    ({"kind": "custom", "class": "m:C", "x": 1, "options": {"x": 2}}, "model.x: given both"),
    ({"kind": "softmax", "class": "m:C"}, "model.class: only kind custom takes class"),
    ({"kind": "mlp", "hidden": [4], "width": 3}, "model.width: unknown key"),
])
def test_bad_custom_sections_name_the_key(tmp_path: Path, model: dict[str, object], needle: str) -> None:
    with pytest.raises(BadInput) as e:
        _load(tmp_path, model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_mlp_compute_float32_is_checked_built_and_keeps_checkpoints_compatible(tmp_path: Path) -> None:
    from fleetmpi.models import build_model
    mlp = {"kind": "mlp", "hidden": [8]}
    s64 = _load(tmp_path, mlp, "a.yaml", "dense")
    s32 = _load(tmp_path, {**mlp, "compute": "float32"}, "b.yaml", "dense")
    assert build_model(s32.model, 5, 3).dtype == "float32" and build_model(s64.model, 5, 3).dtype == "float64"
    assert "compute" not in yaml.safe_load(specmod.dump(s64))["model"]        # old hashes stay as they were
    assert s32.spec_hash() != s64.spec_hash()                                 # another run, another hash
    assert s32.model.identity() == s64.model.identity()                       # same parameters: resumable
    with pytest.raises(BadInput, match="only kinds mlp, linear and logistic take compute"):
        _load(tmp_path, {"kind": "softmax", "compute": "float32"}, "c.yaml", "dense")
    with pytest.raises(BadInput, match=r"model\.compute: sync exact"):
        _load(tmp_path, {**mlp, "compute": "float32"}, "d.yaml", "exact")
    with pytest.raises(BadInput, match="compute"):
        _load(tmp_path, {**mlp, "compute": "float16"}, "e.yaml", "dense")
