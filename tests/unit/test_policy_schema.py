"""Policy files: every shipped one validates; every kind of mistake is reported, all at once."""

import subprocess
import sys
import textwrap

import jsonschema
import pytest
import yaml

from oomguard.errors import PolicyError
from oomguard.policy import load_policy, load_policy_arg, parse_policy, policy_json_schema, shipped_policy_paths

GOOD = """\
name: t4
match: {name: ["T4"], memory_gib: {min: 13, max: 17}, priority: 10}
capabilities: {bf16: false}
knobs:
  max_seq_length: 1024
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 8
  lora_r: 16
  lora_alpha: 32
  precision: fp16
  learning_rate: 2e-4
ladders:
  cuda_oom:
    rungs:
      - {knob: max_seq_length, op: quantile_step, floor: 256, resume: reindex}
      - {op: halve_batch, floor: 1, resume: safe}
  nan_loss:
    rungs:
      - {knob: learning_rate, op: scale, factor: 0.5, resume: numeric}
"""


def write(tmp_path, text, name="t4.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path, text):
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, text))
    return info.value.problems


@pytest.mark.parametrize("name", sorted(shipped_policy_paths()))
def test_every_shipped_policy_validates(name):
    path = shipped_policy_paths()[name]
    policy = load_policy(path)
    assert policy.name == path.stem
    assert policy.source == str(path)
    jsonschema.validate(yaml.safe_load(path.read_text()), policy_json_schema())


def test_shipped_set_is_complete():
    expected = {"default", "demo", "t4-16gb", "rtx-24gb", "l4-24gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb"}
    assert expected <= set(shipped_policy_paths())


def test_good_file_loads_and_reads_2e_minus_4_as_float(tmp_path):
    policy = load_policy(write(tmp_path, GOOD))
    assert policy.start_knobs()["learning_rate"] == pytest.approx(2e-4)


def test_unknown_key_is_named_with_allowed_keys(tmp_path):
    (line,) = problems_of(tmp_path, GOOD + "limits: {max_attemps: 3}\n")
    assert line.startswith(f"{tmp_path / 't4.yaml'}: limits.max_attemps: unknown key 'max_attemps'")
    assert "did you mean 'max_attempts'" in line and "allowed: max_attempts, no_progress_attempts" in line


def test_wrong_type_gives_path_got_and_expected(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace("max_seq_length: 1024", "max_seq_length: long"))
    assert line.endswith("knobs.max_seq_length: wrong type (got str 'long', expected an integer)")


def test_out_of_range_knob(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace("max_seq_length: 1024", "max_seq_length: 8"))
    assert "knobs.max_seq_length: out of range (got int 8, expected >= 16)" in line


def test_unknown_knob_in_rung(tmp_path):
    text = GOOD.replace("knob: learning_rate", "knob: weight_decay")
    (line,) = problems_of(tmp_path, text)
    assert "ladders.nan_loss.rungs.0.knob: unknown knob 'weight_decay'" in line


def test_empty_cuda_oom_ladder(tmp_path):
    text = GOOD.replace("""      - {knob: max_seq_length, op: quantile_step, floor: 256, resume: reindex}
      - {op: halve_batch, floor: 1, resume: safe}""", "      []").replace("rungs:\n      []", "rungs: []")
    (line,) = problems_of(tmp_path, text)
    assert "ladders.cuda_oom.rungs: the cuda_oom ladder is empty" in line


def test_floor_above_start_has_the_documented_line(tmp_path):
    path = write(tmp_path, GOOD.replace("{op: halve_batch, floor: 1", "{op: halve_batch, floor: 4"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems == [
        f"{path}: ladders.cuda_oom.rungs.1.floor: floor 4 is not below the starting "
        "per_device_train_batch_size 2, this rung can never help (got 4, expected < 2)"]


def test_bf16_on_a_card_without_it(tmp_path):
    text = GOOD.replace("precision: fp16", "precision: bf16") + \
        "      - {knob: precision, op: set, value: bf16, resume: numeric}\n"
    lines = problems_of(tmp_path, text)
    assert any("knobs.precision: precision bf16 but capabilities.bf16 is false" in x for x in lines)
    assert any("ladders.nan_loss.rungs.1.value: sets precision bf16" in x for x in lines)


def test_malformed_yaml_reports_line_and_column(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace("  lora_r: 16", "  lora_r: 16: 3"))
    assert "line 8, column" in line and "malformed YAML" in line


def test_duplicate_key_is_reported_with_its_line(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace("  lora_r: 16", "  lora_r: 16\n  lora_r: 8"))
    assert ": line 9: duplicate key 'lora_r'" in line


def test_all_problems_of_a_file_at_once(tmp_path):
    text = (GOOD.replace("{op: halve_batch, floor: 1", "{op: halve_batch, floor: 4")
                .replace("lora_alpha: 32", "lora_alpha: -1")
                .replace("name: t4", "name: t4\ncolour: red"))
    text += "limits: {crash_retries: many}\nflags: {rank: {names: [--r]}}\n"
    lines = problems_of(tmp_path, text)
    keys = [x.split(": ")[1] for x in lines]
    assert set(keys) == {"colour", "knobs.lora_alpha", "limits.crash_retries"}, lines
    # knobs failed, so the checks that need the starting knobs cannot run; with good knobs they do:
    lines = problems_of(tmp_path, text.replace("lora_alpha: -1", "lora_alpha: 32"))
    keys = [x.split(": ")[1] for x in lines]
    assert set(keys) == {"colour", "limits.crash_retries", "flags.rank", "ladders.cuda_oom.rungs.1.floor"}, lines


def test_unknown_and_missing_op(tmp_path):
    lines = problems_of(tmp_path, GOOD.replace("op: halve_batch, ", "op: quarter_batch, ")
                        .replace("op: scale, ", ""))
    assert any("ladders.cuda_oom.rungs.1: unknown op 'quarter_batch'" in x for x in lines)
    assert any("ladders.nan_loss.rungs.0: a rung needs an 'op' key" in x for x in lines)


def test_then_loop_and_missing_target(tmp_path):
    text = GOOD.replace("  nan_loss:\n", "  hang: {then: crash}\n  host_oom: {then: eval_oom}\n  eval_oom: {then: host_oom}\n  nan_loss:\n")
    lines = problems_of(tmp_path, text)
    assert any("ladders.hang.then: no crash ladder" in x for x in lines)
    assert any("ladders.host_oom.then: then: makes a loop" in x for x in lines)


def test_set_to_start_value_and_step_down_with_nothing_below(tmp_path):
    text = GOOD + ("      - {knob: lora_alpha, op: set, value: 32, resume: numeric}\n"
                   "      - {knob: lora_r, op: step_down, values: [64, 32], resume: transform}\n"
                   "      - {knob: precision, op: set, value: fp16, resume: numeric}\n")
    lines = problems_of(tmp_path, text)
    assert any("rungs.1.value: sets lora_alpha to its starting value" in x for x in lines)
    assert any("rungs.2.values: no value below the starting lora_r 16" in x for x in lines)
    # precision is exempt: a command's --bf16 flag may start elsewhere than the policy
    assert not any("rungs.3" in x for x in lines)


def test_top_level_not_a_mapping():
    with pytest.raises(PolicyError, match="a policy is a mapping"):
        parse_policy(["x"], "list.yaml")


def test_load_policy_arg_by_name_path_and_unknown(tmp_path):
    assert load_policy_arg("demo").name == "demo"
    assert load_policy_arg(str(write(tmp_path, GOOD))).name == "t4"
    with pytest.raises(PolicyError) as info:
        load_policy_arg("h100")
    assert "h100-80gb" in str(info.value) and "demo" in str(info.value)


def test_json_schema_hides_source_and_describes_rungs():
    schema = policy_json_schema()
    assert "source" not in schema["properties"] and "_source" not in schema["properties"]
    assert {"ScaleRung", "SetRung", "StepDownRung", "HalveBatchRung", "QuantileStepRung"} <= set(schema["$defs"])


def test_policy_layer_does_not_import_torch():
    code = "import sys, oomguard.policy; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
