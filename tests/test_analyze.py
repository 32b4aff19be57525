"""analyze.py: Eq. 11 on hand-computed cases, the Table-1 perturbation test against an independent
full-forward check, and `python train.py analyze` end to end on a tiny checkpoint."""

import json
import math
import re

import pytest
import torch

from analyze import (_figure_choice, content_words, jaccard, main, perturbation_batch, perturbation_test,
                     select_positions, summarize_perturbation)
from attention_metrics import coupling_stats
from cli import UsageError
from conftest import tiny_config
from model import Qwen3Config, Transformer
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = Transformer(Qwen3Config(**tiny_config(vocab_size=tokenizer.vocab_size))).eval()
    return model, tokenizer


def save_run(root, model, tokenizer, run=None, rl=None):
    """A train.py-like run folder: root/model (checkpoint) and root/run_config.json."""
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    if run is not None:
        (root / "run_config.json").write_text(json.dumps({"run": run, "rl": rl or {}}))
    return root / "model"


def strict_json(text):
    """json.loads that rejects NaN / Infinity (not valid JSON)."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))


# -----------------------------------------------------------------------------
# Eq. 11 and position selection, by hand


def test_content_words_hand_cases():
    assert content_words("The cat, the DOG and 42 cats!") == {"cat", "dog", "42", "cats"}
    assert content_words("x_1 = 3*4") == {"x", "1", "3", "4"}  # underscores and symbols split words
    assert content_words("Café NAÏVE") == {"café", "naïve"}
    assert content_words("it is what it is") == set()


def test_jaccard_hand_cases():
    assert jaccard({"a", "b", "c"}, {"b", "c", "d"}) == 0.5
    assert jaccard(set(), set()) == 1.0
    assert jaccard({"a"}, set()) == 0.0
    assert jaccard(["a", "a", "b"], ["b"]) == 0.5  # sets, not multisets
    # {add, 3, 5, get, 8} vs {multiply, 3, 5, get, 15}: 3 shared of 7
    assert jaccard(content_words("Add 3 and 5 to get 8"), content_words("Multiply 3 by 5 to get 15")) == 3 / 7


def test_select_positions_hand_case():
    fai = [0.5, 0.9, 0.1, 0.9, 0.3, 0.1, 0.7, 0.0, 0.0]
    # tail 2 leaves indices 0..6; highest: 1, 3 (tie, earlier first), 6; lowest of the rest: 2, 5 (tie), 4
    assert select_positions(fai, 3, tail=2) == ([1, 3, 6], [2, 4, 5])
    assert select_positions(fai, 2, tail=2) == ([1, 3], [2, 5])
    # 3 candidates: only one position per group fits without overlap
    assert select_positions([0.2, 0.8, 0.5, 0.0], 3, tail=1) == ([1], [0])
    assert select_positions([0.2, 0.8], 3, tail=1) == ([], [])


def test_summarize_perturbation_hand_case():
    results = [dict(jaccard_high=0.2, jaccard_low=0.6), None, dict(jaccard_high=0.5, jaccard_low=0.5),
               dict(jaccard_high=0.8, jaccard_low=0.4)]
    s = summarize_perturbation(results)
    assert s["problems"] == 3 and s["skipped"] == 1 and s["ties"] == 1
    assert math.isclose(s["jaccard_high"], 0.5) and math.isclose(s["jaccard_low"], 0.5)
    assert s["high_deviates_more"] == 1 and math.isclose(s["high_deviates_more_share"], 1 / 3)


def test_figure_choice_prefers_shortest_correct():
    responses = [[1] * 9, [1] * 3, [1] * 5, [1]]
    assert _figure_choice(responses, [True, False, True, True])[0] == 2  # 1-token responses are not drawn
    index, note = _figure_choice(responses, [False] * 4)
    assert index == 1 and "no correct response" in note
    assert _figure_choice([[], [1]], [True, True])[0] is None


# -----------------------------------------------------------------------------
# The perturbation test on a tiny model, checked with plain full forwards


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float()  # (T, V)


@pytest.mark.parametrize("reference", ["response", "greedy"])
def test_perturbation_test_forces_alternatives_and_continues_greedily(tiny, reference):
    model, tokenizer = tiny
    eos = tokenizer.eos_id
    prompt = tokenizer.encode("12 5 3 -> 51\n")
    response = model.generate([prompt], 26, temperature=1.0, seed=3)[0]
    response = [t for t in response if t != eos][:24]
    fai = torch.rand(len(response), generator=torch.Generator().manual_seed(1)).tolist()
    result = perturbation_test(model, tokenizer, prompt, response, fai, num_positions=3, k=3, max_tokens=6,
                               tail=10, reference=reference, batch_rows=7)
    top, bottom = select_positions(fai, 3, 10)
    assert (result["high_positions"], result["low_positions"]) == (top, bottom)
    assert [e["position"] for e in result["positions"]] == top + bottom
    full = _logits(model, prompt + response)
    for entry in result["positions"]:
        i = entry["position"]
        original = response[i]
        assert entry["original"] == original
        row = full[len(prompt) + i - 1]  # predicts response token i
        alts = [a["token"] for a in entry["alternatives"]]
        assert len(alts) == 3 and original not in alts and eos not in alts
        # the 3 most likely tokens other than the original and eos (up to float ties)
        others = torch.ones_like(row, dtype=torch.bool)
        others[alts + [original, eos]] = False
        assert float(row[alts].min()) >= float(row[others].max()) - 1e-5
        continuations = [a["continuation_ids"] for a in entry["alternatives"]]
        if reference == "greedy":
            assert entry["reference_ids"][0] == original
            continuations.append(entry["reference_ids"])
        else:
            assert entry["reference_ids"] == response[i:i + 7]
        for ids in continuations:
            assert ids[0] != original or ids is entry["reference_ids"]
            assert len(ids) <= 7 and (len(ids) == 7 or ids[-1] == eos)
            # every token after the forced one is a greedy choice of an unpadded full forward
            prefix = prompt + response[:i]
            logits = _logits(model, prefix + ids)
            for j in range(1, len(ids)):
                step = logits[len(prefix) + j - 1]
                assert float(step[ids[j]]) >= float(step.max()) - 1e-4
        for alt in entry["alternatives"]:
            assert alt["continuation_ids"][0] == alt["token"] != original
            expected = jaccard(content_words(tokenizer.decode([t for t in alt["continuation_ids"] if t != eos])),
                               content_words(tokenizer.decode([t for t in entry["reference_ids"] if t != eos])))
            assert alt["jaccard"] == expected and 0.0 <= alt["jaccard"] <= 1.0
    for group in ("high", "low"):
        values = [a["jaccard"] for e in result["positions"] if e["group"] == group for a in e["alternatives"]]
        assert math.isclose(result[f"jaccard_{group}"], sum(values) / len(values))


def test_perturbation_batch_skips_short_responses_and_checks_inputs(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("7 2 -> 9\n")
    out = perturbation_batch(model, tokenizer, [prompt, prompt], [[50, 51, 52], list(range(60, 76))],
                             [[0.1, 0.2, 0.3], [0.1] * 16], max_tokens=2, tail=10)
    assert out[0] is None and out[1] is not None
    assert len(out[1]["high_positions"]) == len(out[1]["low_positions"]) == 3
    with pytest.raises(ValueError, match="fai has 2 entries"):
        perturbation_test(model, tokenizer, prompt, [50, 51, 52], [0.1, 0.2])
    with pytest.raises(ValueError, match="reference"):
        perturbation_test(model, tokenizer, prompt, [50, 51, 52], [0.1, 0.2, 0.3], reference="sampled")


# -----------------------------------------------------------------------------
# End to end


def test_analyze_end_to_end_countdown(tiny, tmp_path):
    model, tokenizer = tiny
    run = dict(task="countdown", num_numbers=3, max_number=20, max_target=100, prompt_style="compact", seed=0)
    model_dir = save_run(tmp_path / "run", model, tokenizer, run, dict(max_new_tokens=24, stop_ids=[]))
    summary = main(["--init", str(model_dir), "--num-prompts", "4", "--perturb-tokens", "6", "--batch-size", "3",
                    "--device", "cpu"])
    out = tmp_path / "run" / "analysis"  # default: beside the model of a train.py run
    couplings = strict_json((out / "couplings.json").read_text())
    perturbation = strict_json((out / "perturbation.json").read_text())
    rows = [strict_json(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert strict_json((out / "summary.json").read_text())["num_responses"] == 4 == summary["num_responses"]
    assert (out / "rhythm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<html" in (out / "rhythm.html").read_text()

    assert len(rows) == 4
    for row in rows:
        assert re.fullmatch(r"(\d+ ){3}-> \d+\n", row["prompt"])  # the run's compact style, 3 numbers
        assert 1 <= len(row["token_ids"]) <= 24
        assert len(row["tokens"]) == len(row["waad"]) == len(row["fai"]) == len(row["fai_receiver"]) == \
            len(row["entropy"]) == len(row["token_ids"])
        assert row["reward"] in (0.0, 0.1, 1.0)
    # couplings.json holds coupling_stats of exactly the signals written to the JSONL
    # null in responses.jsonl: FAI undefined there (empty T(s))
    records = [{k: torch.tensor([math.nan if x is None else x for x in r[k]])
                for k in ("waad", "fai", "fai_receiver", "entropy")} for r in rows]
    for name, stat in coupling_stats(records, seed=0).items():
        for key in ("random", "observed", "count"):
            got, want = couplings["stats"][name][key], stat[key]
            assert (got is None and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-6)
    # perturbation.json summarizes the per-response results of the JSONL
    done = [r["perturbation"] for r in rows if r["perturbation"] is not None]
    s = perturbation["summary"]
    assert s["problems"] == len(done) >= 1 and perturbation["paper"]["jaccard_top"] == 0.534
    assert math.isclose(s["jaccard_high"], sum(p["jaccard_high"] for p in done) / len(done))
    assert math.isclose(s["jaccard_low"], sum(p["jaccard_low"] for p in done) / len(done))
    assert 0.0 <= s["jaccard_high"] <= 1.0 and 0.0 <= s["jaccard_low"] <= 1.0


def test_analyze_gsm8k_and_prompts_files(tiny, tmp_path):
    model, tokenizer = tiny
    model_dir = save_run(tmp_path, model, tokenizer)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "Tom has 3 apples. He buys 2 more. How many apples has he?",
                                "answer": "3 + 2 = 5\n#### 5"}) + "\n")
    main(["--init", str(model_dir), "--task", "gsm8k", "--data", str(data), "--max-new-tokens", "12",
          "--no-perturbation", "--out", str(tmp_path / "g")])
    row = strict_json((tmp_path / "g" / "responses.jsonl").read_text())
    assert row["prompt"].startswith("System: Please reason step by step, and put your final answer within \\boxed{}.")
    assert "Question: How many apples has he?" in row["prompt"] and row["reward"] in (0.0, 1.0)
    assert not (tmp_path / "g" / "perturbation.json").exists()

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello", "2 + 2 =")))
    summary = main(["--init", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "12", "--perturb-tokens",
                    "2", "--h-lo", "2", "--out", str(tmp_path / "p")])
    rows = [strict_json(line) for line in (tmp_path / "p" / "responses.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "2 + 2 ="] and all(r["reward"] is None for r in rows)
    assert "no correct response" in summary["figure_note"]
    assert (tmp_path / "p" / "rhythm.png").is_file() and (tmp_path / "p" / "perturbation.json").is_file()


def test_analyze_clear_errors(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    with pytest.raises(UsageError, match="--init .*no such directory"):
        main(["--init", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        main(["--init", str(tmp_path / "empty")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run `python train\.py` first"):
        main([])
    model_dir = save_run(tmp_path / "run", model, tokenizer)
    with pytest.raises(ValueError, match="either --prompts or --task"):
        main(["--init", str(model_dir), "--prompts", "p.jsonl", "--task", "gsm8k"])
    with pytest.raises(ValueError, match="--num-prompts must be >= 1"):
        main(["--init", str(model_dir), "--num-prompts", "0"])
    with pytest.raises(ValueError, match="unrecognized arguments"):
        main(["--init", str(model_dir), "--bogus"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--init", str(model_dir), "--prompts", str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="--max-new-tokens 600"):
        main(["--init", str(model_dir), "--max-new-tokens", "600", "--num-prompts", "1"])
