"""Flags derive from the configs: every setting a step accepts has a flag, booleans can be turned
off, and a flag the chosen method does not take is refused."""

import dataclasses
import json

import pytest

from slimlm.cli import build_parser, main
from slimlm.core.steps import STEPS


@pytest.mark.parametrize("verb", ["quantize", "prune"])
def test_every_cli_field_of_every_step_has_a_flag(verb):
    parser = build_parser((verb,))
    sub = parser._subparsers._group_actions[0].choices[verb]
    dests = {a.dest for a in sub._actions}
    for step in STEPS.steps(verb):
        for f in dataclasses.fields(step.config_cls):
            if f.metadata.get("cli"):
                assert f.name in dests, f"{step.name}.{f.name} has no flag"
            else:
                assert "help" in f.metadata or f.name == "version", f"{step.name}.{f.name} has no help text"


def test_act_order_can_be_turned_off(tmp_path, capsys):
    """It was a store_true whose default was already True: the flag did nothing."""
    code = main(["quantize", "demo", "-o", str(tmp_path / "x"), "-m", "gptq", "--no-act-order", "--dry-run", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and '"act_order": false' in out
    main(["quantize", "demo", "-o", str(tmp_path / "x"), "-m", "gptq", "--dry-run", "--json"])
    assert '"act_order": true' in capsys.readouterr().out


def test_a_flag_of_another_method_is_refused(tmp_path, capsys):
    code = main(["quantize", "demo", "-o", str(tmp_path / "x"), "-m", "gptq", "--grid", "5", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "--grid does not apply to gptq" in err and len(err.strip().splitlines()) == 1


def test_overrides_and_none_values_parse(tmp_path, capsys):
    code = main(["quantize", "demo", "-o", str(tmp_path / "x"), "--bits", "4", "--group-size", "none",
                 "--override", "*.self_attn.*=bits:8,group_size:none", "--override", "model.layers.0.*=skip",
                 "--dry-run", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and '"model.layers.0.*": "skip"' in out
    step = json.loads(out)[0]["step"]
    # 'none' typed on the command line sets per-channel scales; it was once read as "flag not given"
    # (the default, g128), which the override's own group_size:none hid from this test
    assert step["group_size"] is None and step["overrides"]["*.self_attn.*"]["group_size"] is None
