"""`nanoserve bench` runs end to end on a tiny model, with both baselines, and writes JSON."""
import json

import pytest

from server.cli import main


@pytest.mark.parametrize("baseline", ["hf", "naive"])
def test_bench_reports_throughput_and_roofline(tmp_path, capsys, baseline):
    out = tmp_path / "bench.json"
    main(["bench", "--model", "random:tiny-gpt2", "--dtype", "float32", "--num-prompts", "4", "--input-len", "8",
          "--output-len", "6", "--baseline", baseline, "--json", str(out)])
    results = json.loads(out.read_text())
    assert len(results) == 2
    ours = results[0]
    assert ours["name"] == "nanoserve" and ours["output_tokens_per_s"] > 0
    assert {"peak_gflops", "roofline_fraction", "peak_rss_gib", "kv_cache_gib", "measured_read_gbps",
            "memory_roofline_fraction"} <= set(ours["extra"])
    extra = ours["extra"]
    assert 0 < extra["roofline_fraction"] and 0 < extra["memory_roofline_fraction"]
    assert extra["step_read_mb"] > 0 and extra["decode_batch"] == 4  # 4 prompts decode together
    assert "output tok/s" in capsys.readouterr().out


def test_bench_compares_json_constrained_requests(tmp_path, capsys):
    """--structured-output json runs the same prompts again, each under a JSON schema that no
    request can finish before --output-len, so both runs generate the same number of tokens."""
    out = tmp_path / "bench.json"
    main(["bench", "--model", "random:tiny-qwen2", "--dtype", "float32", "--num-prompts", "4", "--input-len", "8",
          "--output-len", "12", "--structured-output", "json", "--json", str(out)])
    free, constrained = json.loads(out.read_text())
    assert (free["name"], constrained["name"]) == ("nanoserve", "nanoserve + JSON schema")
    assert constrained["output_tokens_per_s"] > 0 and constrained["extra"]["decode_step_counts"]
    assert len(constrained["extra"]["decode_step_ratio_vs_free"]) == 3 and constrained["extra"]["decode_step_ratio_vs_free_median"] > 0
    assert "nanoserve / nanoserve + JSON schema" in capsys.readouterr().out


def test_bench_on_mla_model_reports_latent_kv_and_both_modes(tmp_path):
    """An MLA + MoE model benches in both decode modes; its KV bytes per token are the latent's."""
    for mode in ("absorbed", "naive"):
        out = tmp_path / f"{mode}.json"
        main(["bench", "--model", "random:tiny-deepseek-v2", "--dtype", "float32", "--num-prompts", "3",
              "--input-len", "8", "--output-len", "5", "--mla-mode", mode, "--baseline", "naive", "--json", str(out)])
        ours, naive = json.loads(out.read_text())
        assert ours["extra"]["kv_bytes_per_token"] == 2 * (32 + 16) * 4  # 2 layers x (latent 32 + rope 16) x fp32
        assert ours["output_tokens_per_s"] > 0 and naive["output_tokens_per_s"] > 0
