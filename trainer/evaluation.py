"""Offline evaluation of adapter versions: eval loss and exact match on a JSONL file, side by side.

``loraplex eval NAME@REF --data FILE.jsonl [--against NAME@REF2 | base]``: each row's last assistant message
is the reference. Eval loss is the mean cross-entropy over the reference tokens (teacher-forced, the same
assistant-only labels as training); exact match is the share of rows whose greedy answer, stripped,
equals the reference, stripped. Both run on the base quantized as the server keeps it (NF4 by default).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from .data import IGNORE, DataError, Example, encode_all, read_rows

BASE = "base"


@dataclass
class EvalResult:
    ref: str  # as asked
    resolved: str  # NAME@VERSION, or "base"
    rows: int
    eval_loss: float
    exact_match: float
    answers: list[str]  # greedy answers, in row order


def _loss(model, examples: list[Example], pad_id: int, batch_size: int) -> float:
    import torch

    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            ids[j, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[j, : len(e.labels)] = torch.tensor(e.labels)
            mask[j, : len(e.input_ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]
        shift = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shift, ignore_index=IGNORE,
                                                   reduction="sum")
        total += float(losses)
        count += int((shift != IGNORE).sum())
    return total / max(count, 1)


def _answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    out: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            width = enc["input_ids"].shape[1]
            out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    finally:
        tokenizer.padding_side = side
    return out


def evaluate(refs: list[str], data: Path, registry, *, model: str = "smollm2-135m-instruct", quantize: str = "nf4",
             max_seq_len: int = 1024, max_new_tokens: int = 64, batch_size: int = 8) -> list[EvalResult]:
    import torch
    from peft import PeftModel

    from loraplex.server.model.loader import ModelSpec, load_model

    rows, _ = read_rows(data)
    if not rows:
        raise DataError(f"{data}: no rows to evaluate")
    fetched = {}
    for ref in refs:  # resolve everything before loading the model: a bad ref fails in a second
        if ref != BASE and ref not in fetched:
            fetched[ref] = registry.fetch(ref)
    loaded = load_model(ModelSpec(model=model, quantize=quantize, dtype="float32"))
    tok = loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for manifest, _ in fetched.values():
        registry.check_base(manifest, loaded.info)
    examples, dropped = encode_all(rows, tok, max_seq_len)
    if dropped:
        raise DataError(f"{data}: {dropped} rows have no answer token within {max_seq_len} tokens")
    prompts = [tok.apply_chat_template(list(r.messages[:-1]), tokenize=False, add_generation_prompt=True) for r in rows]
    references = [r.messages[-1]["content"].strip() for r in rows]
    longest = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in references)
    new_tokens = min(max_new_tokens, longest + 8)

    net = loaded.model
    names: dict[str, str] = {}
    for i, (ref, (manifest, path)) in enumerate(fetched.items()):
        names[ref] = f"a{i}"
        if i == 0:
            net = PeftModel.from_pretrained(net, str(path), adapter_name=names[ref])
        else:
            net.load_adapter(str(path), adapter_name=names[ref])
    net.eval()
    results = []
    for ref in refs:
        if ref == BASE:
            ctx = net.disable_adapter() if fetched else nullcontext()
            resolved = BASE
        else:
            net.set_adapter(names[ref])
            ctx = nullcontext()
            resolved = fetched[ref][0].ref
        with ctx, torch.inference_mode():
            loss = _loss(net, examples, tok.pad_token_id, batch_size)
            answers = _answers(net, tok, prompts, new_tokens, batch_size)
        exact = sum(a == r for a, r in zip(answers, references)) / len(references)
        results.append(EvalResult(ref, resolved, len(rows), round(loss, 5), round(exact, 4), answers))
    return results
