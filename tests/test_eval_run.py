"""``megamix eval`` end to end on tiny checkpoints: JSON, plots, resuming, errors, HF directories, cp."""

import json

import matplotlib.image
import pytest
import torch

from megamix.checkpoint import save_checkpoint
from megamix.cli import main
from megamix.config import load_config
from megamix.data import ensure_builtin
from megamix.eval.loading import load_for_eval
from megamix.eval.perplexity import load_tokens, window_losses, windows
from megamix.models import HybridModel
from megamix.parallel import ParallelState
from megamix.testing import run_distributed
from tests.conftest import BUILTIN_VOCAB

MODEL = ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=64",
         f"model.vocab_size={BUILTIN_VOCAB}", "model.mamba.head_dim=8", "model.mamba.state_size=8", "model.mamba.num_groups=2",
         "model.moh.shared_heads=2", "model.moh.routed_top_k=1", "model.moe.num_experts=2",
         "model.moe.ffn_hidden_size=32"]
PATTERN = "*H-LME"


def hybrid_model(seed=3, tp=None):
    cfg = load_config(None, [*MODEL, f"model.pattern={PATTERN}"]).model
    return HybridModel(cfg, seed=seed, **({"tp": tp} if tp else {})).eval()


@pytest.fixture(scope="module")
def checkpoint(builtin_cache, tmp_path_factory):
    """A random tiny hybrid saved as a megamix checkpoint that names the builtin tokenizer."""
    root = tmp_path_factory.mktemp("eval-ckpt")
    config = load_config(None, [*MODEL, f"model.pattern={PATTERN}", f"data.cache_dir={builtin_cache}"])
    model = hybrid_model()
    save_checkpoint(root, 0, {f"model.{k}": v for k, v in model.state_dict().items()}, config.to_dict(), {})
    return root


@pytest.fixture(scope="module")
def heldout(builtin_cache):
    return ensure_builtin(builtin_cache, BUILTIN_VOCAB)  # PREFIX of the builtin token files


def test_eval_writes_records_summary_and_plots_and_resumes(checkpoint, heldout, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(checkpoint), "--suite", "passkey", "niah", "perplexity", "--lengths", "256", "128",
            "--samples", "2", "--depths", "0", "1", "--tokens", heldout, "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "passkey" in printed and "perplexity" in printed and "results in" in printed
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["cells"]) == sorted(["passkey/128", "passkey/256", "niah/128/0", "niah/128/1",
                                               "niah/256/0", "niah/256/1", "perplexity/128", "perplexity/256"])
    generated = [r for r in results["records"] if r["task"] != "perplexity"]
    assert len(generated) == 12 and all(r["prompt_tokens"] <= r["length"] for r in generated)
    assert all(r["score"] in (0.0, 1.0) and isinstance(r["output"], str) for r in generated)
    ppl = results["cells"]["perplexity/256"]
    assert ppl["value"] == pytest.approx(torch.tensor(ppl["loss"]).exp().item(), rel=1e-5)
    assert ppl["by_position"][-1][1] == 256
    assert [row["task"] for row in results["summary"]] == ["passkey", "niah", "perplexity"]
    image = matplotlib.image.imread(out / "niah_heatmap.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert (out / "perplexity.png").is_file() and (out / "scores_by_length.png").is_file()

    results["cells"]["passkey/128"]["value"] = 55.5  # a finished cell is not run again
    (out / "results.json").write_text(json.dumps(results))
    assert main(["eval", str(checkpoint), "--suite", "passkey", "--lengths", "128", "512", "--samples", "2",
                 "--depths", "0", "1", "--tokens", heldout, "--out", str(out)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["cells"]["passkey/128"]["value"] == 55.5 and "passkey/512" in resumed["cells"]
    assert len(resumed["records"]) == len(results["records"]) + 2


def test_bad_input_is_a_clear_error(checkpoint, heldout, tmp_path, capsys):
    cases = [
        (["eval", str(tmp_path / "nowhere"), "--lengths", "128"], "does not exist"),
        (["eval", str(checkpoint), "--suite", "passkeys", "--lengths", "128"], "unknown suite or task 'passkeys'"),
        (["eval", str(checkpoint), "--suite", "common_words", "--lengths", "64"], "too short for task common_words"),
        (["eval", str(checkpoint), "--suite", "perplexity", "--lengths", "64"], "needs a held-out token file"),
        (["eval", str(checkpoint), "--suite", "perplexity", "--lengths", str(10**9), "--tokens", heldout],
         "fewer than length"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err


def test_hf_directory_is_converted_and_its_length_limit_enforced(builtin_cache, heldout, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(vocab_size=BUILTIN_VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    args = ["eval", str(tmp_path / "hf"), "--tokenizer", heldout + ".model", "--suite", "passkey", "perplexity",
            "--samples", "1", "--tokens", heldout, "--out", str(tmp_path / "out")]
    assert main([*args, "--lengths", "512"]) == 2
    assert "beyond what" in capsys.readouterr().err
    assert main([*args, "--lengths", "200"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # the converted model scores the held-out window as HF's own forward does
    em = load_for_eval(tmp_path / "hf", heldout + ".model")
    window = windows(load_tokens(heldout, None), 200, 1)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(hf(window[:, :-1]).logits[0], window[0, 1:])
    assert results["cells"]["perplexity/200"]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert em.max_length == 256


def cp_window_losses(cp, tp, window):
    parallel = ParallelState.create(tp=tp, cp=cp)
    return window_losses(hybrid_model(tp=parallel.tensor_parallel), window, parallel)


def test_perplexity_windows_under_cp_and_tp_equal_one_process():
    window = torch.randint(0, BUILTIN_VOCAB, (2, 65), generator=torch.Generator().manual_seed(1))
    reference = window_losses(hybrid_model(), window, ParallelState.single())
    for losses in run_distributed(cp_window_losses, 4, 2, 2, window):
        torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-5)
