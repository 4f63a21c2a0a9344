"""The training config and data readers: every key documented, every bad input a message naming where.

No model is loaded here; tokenization uses the tiny word-level tokenizer of the server tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from server_fixtures import tiny_tokenizer
from loraplex.trainer.config import DataSection, LoraSection, TrainConfig, TrainConfigError, TrainSection, load_config
from loraplex.trainer.data import IGNORE, DataError, Row, encode, read_rows, split
from loraplex.trainer.recipe import prepare

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train.yaml"
# Keys whose value in the example differs from the default on purpose (the example points at its data).
EXAMPLE_DIFFERS = {"output_dir", "data.train"}


def _fields(model, prefix=""):
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, (LoraSection, DataSection, TrainSection)):
            yield from _fields(ann, prefix + name + ".")
        else:
            yield prefix + name, f


def test_example_config_lists_every_key_with_its_default():
    tree = yaml.safe_load(EXAMPLE.read_text())
    for key, f in _fields(TrainConfig):
        node = tree
        for part in key.split("."):
            assert part in node, f"examples/train.yaml lacks {key}"
            node = node[part]
        assert f.description, f"{key} has no description"
        if key in EXAMPLE_DIFFERS:
            continue
        default = f.get_default(call_default_factory=True)
        assert node == default, f"examples/train.yaml: {key} is {node!r}, the default is {default!r}"
    cfg, base = load_config(EXAMPLE)
    assert base == EXAMPLE.parent
    assert (base / cfg.data.train[0]).is_file()


def test_overrides_are_typed_and_dotted(tmp_path):
    cfg, _ = load_config(EXAMPLE, ["train.max_steps=40", "lora.r=8", "lora.target_modules=[q_proj, v_proj]",
                                   "data.packing=true", "train.learning_rate=2e-4"])
    assert (cfg.train.max_steps, cfg.lora.r, cfg.lora.target_modules, cfg.data.packing) == (40, 8, ["q_proj", "v_proj"], True)
    assert cfg.train.learning_rate == 2e-4
    cfg, base = load_config(None, ["data.train=[a.jsonl]"])
    assert cfg.data.train == ["a.jsonl"] and base == Path.cwd()


@pytest.mark.parametrize("text,overrides,message", [
    ("lora: {rank: 8}\ndata: {train: [a.jsonl]}\n", [], "lora.rank: unknown key"),
    ("data: {train: [a.jsonl]}\nlearning_rate: 1\n", [], "learning_rate: unknown key"),
    ("model: x\n", [], "data: Field required"),
    ("data: {train: []}\n", [], "data.train"),
    ("data: {train: [a.jsonl]}\nlora: {r: 0}\n", [], "lora.r: Input should be greater than or equal to 1"),
    ("data: {train: [a.jsonl]}\nquantize: fp8\n", [], "quantize: Input should be 'nf4' or 'none'"),
    ("data: {train: [a.jsonl]}\ntrain: {batch_size: many}\n", [], "train.batch_size"),
    ("data: {train: [a.jsonl]}\nlora: {target_modules: [../x]}\n", [], "lora.target_modules"),
    ("data: {train: [a.jsonl]}\n", ["train.max_steps"], "is not key=value"),
    ("data: {train: [a.jsonl]}\n", ["lora.r.x=1"], "lora.r: Input should be a valid integer"),
    ("data: {train: [a.jsonl]}\n", ["train.nope=1"], "train.nope: unknown key"),
    ("data: [\n", [], "not valid YAML"),
    ("- just\n- a list\n", [], "must be a mapping"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(TrainConfigError) as e:
        load_config(p, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(TrainConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


# ---- data -------------------------------------------------------------------------------------
def _jsonl(tmp_path: Path, lines: list, name="d.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
                           for x in lines))
    return p


CHAT = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]}


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a row must be a JSON object"),
    ({"text": "hi"}, "needs messages (chat) or instruction and output"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": "w1"}]}, "the last message must be the assistant's answer"),
    ({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "  "}]}, "answer is empty"),
    ({"messages": [{"role": "system", "content": "w1"}, {"role": "assistant", "content": "w2"}]}, "needs a user message"),
    ({"instruction": "", "output": "w1"}, "instruction must be a non-empty string"),
    ({"instruction": "w1", "input": 5, "output": "w2"}, "input must be a string"),
    ({"instruction": "w1"}, "output must be a non-empty string"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, message):
    p = _jsonl(tmp_path, [CHAT, "", bad, CHAT])
    with pytest.raises(DataError) as e:
        read_rows(p)
    assert str(e.value).startswith(f"{p}:3: ") and message in str(e.value), str(e.value)


def test_oversized_line_is_refused_without_reading_it_whole(tmp_path):
    p = _jsonl(tmp_path, [CHAT, json.dumps({"instruction": "w1 " * 400_000, "output": "w2"})])
    with pytest.raises(DataError, match=r":2: line longer than"):
        read_rows(p)


def test_chat_and_alpaca_rows_and_the_file_record(tmp_path):
    p = _jsonl(tmp_path, [CHAT, {"instruction": "w5", "input": "w6", "output": "w7"}, {"instruction": "w5", "output": "w7"}])
    rows, f = read_rows(p)
    assert f.rows == 3 and len(f.sha256) == 64
    assert rows[1].messages == ({"role": "user", "content": "w5\n\nw6"}, {"role": "assistant", "content": "w7"})
    assert rows[2].messages[0]["content"] == "w5" and rows[2].source == f"{p}:3"


def test_labels_cover_assistant_tokens_only_in_every_turn():
    tok = tiny_tokenizer()
    row = Row("x:1", (
        {"role": "system", "content": "w9"}, {"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"},
        {"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5 w6"}))
    ex = encode(row, tok, 512)
    words = tok.convert_ids_to_tokens(ex.input_ids)
    learned = [w for w, lab in zip(words, ex.labels) if lab != IGNORE]
    # Each answer and the end-of-turn marker after it; nothing from system or user turns.
    assert learned == ["w3", "<|im_end|>", "w5", "w6", "<|im_end|>"]
    assert all(lab in (IGNORE, i) for lab, i in zip(ex.labels, ex.input_ids))
    assert encode(row, tok, 4) is None  # cut before any answer token


def test_split_is_seeded_and_disjoint():
    rows = [Row(f"f:{i}", ()) for i in range(50)]
    a_train, a_eval = split(rows, 0.1, seed=3)
    b_train, b_eval = split(rows, 0.1, seed=3)
    assert a_eval == b_eval and len(a_eval) == 5 and len(a_train) == 45
    assert not {r.source for r in a_eval} & {r.source for r in a_train}
    assert split(rows, 0.1, seed=4)[1] != a_eval
    assert split(rows, 0.0, seed=3) == (rows, [])


def test_empty_or_too_short_data_fails_before_training(tmp_path):
    tok = tiny_tokenizer()
    empty = _jsonl(tmp_path, ["", "  "], "empty.jsonl")
    cfg, base = load_config(None, [f"data.train=[{empty}]"])
    with pytest.raises(DataError, match=r"only 0 usable train rows, fewer than data.min_rows=16"):
        prepare(cfg, base, tok)
    short = _jsonl(tmp_path, [CHAT] * 10, "short.jsonl")
    cfg, base = load_config(None, [f"data.train=[{short}]"])
    with pytest.raises(DataError, match=r"only 9 usable train rows"):
        prepare(cfg, base, tok)
    cfg, base = load_config(None, [f"data.train=[{short}]", "data.min_rows=5", "data.max_seq_len=16",
                                   "data.eval_fraction=0"])
    train, evals, info = prepare(cfg, base, tok)
    assert info["train_rows"] == 10 and evals == [] and info["files"][0]["rows"] == 10
    long_prompt = {"messages": [{"role": "user", "content": "w1 " * 40}, {"role": "assistant", "content": "w2"}]}
    cut = _jsonl(tmp_path, [long_prompt] * 20, "cut.jsonl")
    cfg, base = load_config(None, [f"data.train=[{cut}]", "data.max_seq_len=16"])
    with pytest.raises(DataError, match=r"rows left no answer token within max_seq_len=16"):
        prepare(cfg, base, tok)
