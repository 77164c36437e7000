"""`cslm-jax demo`: the bundled end-to-end run on CPU.

What runs today: the demo corpus and its tokenizer (Llama-3 special tokens) -> a random
`transformers` Llama -> `import-hf` with speech units -> our JAX forward checked against PyTorch
-> `export-hf` -> reloaded by `transformers` and checked again -> the SeqIO stage mixtures
producing packed, masked batches. Training (stage 1 and 2) and streaming decoding join this run
as their issues land.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cslm_jax.config import load_model_config

REPO = Path(__file__).resolve().parents[1]


def run_demo(out: str | Path, force: bool = False) -> int:
    import jax.numpy as jnp

    try:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError as e:
        raise SystemExit(f"the demo needs PyTorch (CPU) for its reference model: "
                         f"pip install -r requirements-dev.txt ({e})")
    from cslm_jax.checkpoint import load_params, read_metadata
    from cslm_jax.convert import export_hf, import_hf
    from cslm_jax.model import forward
    from cslm_jax.random_hf import write_random_hf_llama
    from cslm_jax.demo_data import UNIT_COUNT, make_demo_data
    from cslm_jax.vocab import load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to reuse it")
    t0 = time.time()
    tiny = load_model_config(REPO / "configs" / "model" / "tiny.yaml")

    print("[1/6] demo corpus (en, zh) and its BPE tokenizer with Llama-3's special tokens")
    make_demo_data(out / "data", REPO / "configs" / "data" / "demo.yaml", force=True,
                   log=lambda m: print("      " + m))
    tok = load_tokenizer(out / "data" / "tokenizer")

    print("[2/6] a random-weight transformers LlamaForCausalLM (configs/model/tiny.yaml shape)")
    hf_dir = out / "hf_base"
    if hf_dir.exists():
        import shutil
        shutil.rmtree(hf_dir)
    model = write_random_hf_llama(
        hf_dir, tok, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_layers=tiny.num_layers, num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
        head_dim=tiny.head_dim, rope_scaling=tiny.rope_scaling, rope_theta=tiny.rope_theta,
        max_position_embeddings=tiny.max_position_embeddings)

    print(f"[3/6] import-hf with {UNIT_COUNT} speech units")
    ckpt = import_hf(hf_dir, out / "ckpt", speech_units=UNIT_COUNT, force=True,
                     log=lambda m: print("      " + m))
    _, cfg, vocab = read_metadata(ckpt)
    params = load_params(ckpt)

    print("[4/6] our JAX forward vs PyTorch on the same tokens (beyond the original rope context)")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab.base_size, size=(2, 2 * tiny.rope_scaling["original_max_position_embeddings"]))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(cfg.replace(compute_dtype="float32"), params, jnp.asarray(ids)))
    diff = np.abs(ours[..., :vocab.base_size] - ref).max()
    print(f"      max |logit difference| = {diff:.2e} over {ids.size} tokens")

    print("[5/6] export-hf and reload with transformers")
    export = export_hf(ckpt, out / "hf_export", dtype="float32", force=True,
                       log=lambda m: print("      " + m))
    back = LlamaForCausalLM.from_pretrained(str(export), attn_implementation="eager").eval()
    etok = AutoTokenizer.from_pretrained(str(export))
    prompt = etok.apply_chat_template(
        [{"role": "user", "content": "Please directly answer the questions in the user's speech. "
          "This is input: <sosp><12><207><33><eosp>."}], tokenize=False, add_generation_prompt=True)
    pids = etok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        exported = back(torch.tensor([pids])).logits.numpy()
    ours = np.asarray(forward(cfg.replace(compute_dtype="float32"), params, jnp.asarray([pids])))
    diff2 = np.abs(ours[..., :vocab.size] - exported).max()
    speech = etok.encode("<sosp><12><207><33><eosp>", add_special_tokens=False)
    print(f"      exported vocabulary {back.config.vocab_size} = {vocab.base_size} text + "
          f"{vocab.unit_count} units + {len(vocab.control_tokens)} control tokens")
    print(f"      '<sosp><12><207><33><eosp>' -> {speech}")
    print(f"      chat prompt of {len(pids)} tokens: max |logit difference| vs export = {diff2:.2e}")

    print("[6/6] SeqIO stage mixtures over the corpus, with the checkpoint's extended tokenizer")
    from cslm_jax.data import BatchIterator, stats_report
    from cslm_jax.formats import load_data_config
    from tasks.cslm import register

    data_cfg = load_data_config(out / "data" / "data.yaml")
    register(data_cfg, ckpt / "tokenizer")
    batches_ok = True
    for stage in data_cfg.stages:
        it = BatchIterator(data_cfg.mixture_name(stage), max_length=data_cfg.max_length,
                           batch_size=8, seed=0)
        batch = [next(it) for _ in range(4)][-1]
        names = [t.name for t in data_cfg.tasks(stage)]
        seen = sorted({names[i] for i in batch["task_ids"][batch["loss_weights"] > 0]})
        fill = (batch["segment_ids"] > 0).mean()
        trained = batch["loss_weights"].sum() / max((batch["segment_ids"] > 0).sum(), 1)
        print(f"      {data_cfg.mixture_name(stage)}: rows {fill:.0%} full, {trained:.0%} of tokens "
              f"trained; tasks in this batch: {', '.join(seen)}")
        batches_ok &= fill > 0.3 and 0 < trained < 1
    docs = [etok.decode(batch["tokens"][r][batch["segment_ids"][r] == sid])
            for r in range(len(batch["tokens"])) for sid in range(1, batch["segment_ids"][r].max() + 1)]
    answer = next((d[d.rfind("[question]"):] for d in docs if "[question]" in d), "")
    batches_ok &= "<sosp>" in answer
    print(f"      an interleaved stage-2 answer: {answer[:300]}{'...' if len(answer) > 300 else ''}")
    ours = {t.name for t in data_cfg.tasks()}
    counts = [c for name, c in stats_report().items() if name.split(":")[0] in ours]
    skipped = sum(c.get("skipped", 0) for c in counts)
    print(f"      records prepared: {sum(c.get('records', 0) for c in counts)}, skipped {skipped}, "
          f"truncated examples {sum(c.get('truncated', 0) for c in counts)}")
    ok = diff < 1e-4 and diff2 < 1e-4 and len(speech) == 5 and batches_ok and skipped == 0
    print(f"demo {'OK' if ok else 'FAILED'} in {time.time() - t0:.0f}s; outputs in {out}")
    print("not yet in this run: stage 1/2 training, streaming decoding (tracked by their issues)")
    return 0 if ok else 1
