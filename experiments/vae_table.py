"""Sequence VAEs against an LSTM language model, after Bowman et al. 2016 (Table 2).

One row per model, all of the same width, on the same text, for the same
number of steps:

  lstm_lm          LSTM language model (the decoder alone, no code)
  vae              sequence VAE, no tricks (beta = 1 from step 0)
  vae_anneal       + KL annealing (beta rises linearly to 1 over the first half)
  vae_anneal_wd    + word dropout on the decoder inputs (Bowman et al. 2016)
  vae_anneal_wd_fb + free bits per latent dimension (Kingma et al. 2016)
  vae_cyclical     cyclical annealing alone (Fu et al. 2019: 4 cycles, each
                   rising over its first half)

Each row reports, on the same validation sample: NLL in nats per sequence
(the LM's exact NLL; for a VAE the importance-weighted bound of Burda et al.
2016 with `iw_samples` samples, and the ELBO's bound beside it), the KL term
and active units (Burda et al. 2016: Var_x E_q[z_u] > 0.01, over the whole
sample), and bits per byte. Posterior collapse shows as KL ~ 0 and no active
units: the decoder ignores z and the VAE is an LM with extra parameters.

    python experiments/vae_table.py --preset quick          # offline corpus, 2 CPU cores
    python experiments/vae_table.py --preset quick --plot   # redraw from results/vae_table/
    python experiments/vae_table.py --preset full --set data.text_source=files \\
        --set data.text_files='/data/ptb/ptb.train.txt'     # any corpus; PTB as in the paper

Presets:
  quick  the interpreter's standard library as byte-level text, sequences of
         64 bytes, d=256 single-layer LSTMs, 16-dim code, batch 32, 800 steps,
         word dropout 0.025 of the input bytes, free bits 0.1 nats per
         latent dimension.
  full   sequences of 128 bytes, d=512, 32-dim code, batch 64, 20k steps,
         word dropout 0.25, evaluation on 128 batches with 64 importance
         samples.

Records: results/vae_table/runs.jsonl, table.md, figure vae_table.png/.svg
(NLL and KL per row).
"""

from __future__ import annotations

import math
import sys

from wm import sweep

LM, VAE = "configs/text_lstm.py:quick", "configs/vae_text.py:quick"

# Quick drops 2.5% of the decoder's input bytes and frees 0.1 nats per latent dimension. A byte-level
# decoder leans on the bytes just before the one it predicts, so each dropped byte removes the most useful
# context of the next prediction: after 800 steps the word-dropout row ended 11-12% above the LM's NLL at a
# rate of 0.25 (records of commit 85758da) and 4.7% at 0.1 (commit 1847dc9). At 2.5% about one word in
# seven loses a byte. Free bits of 0.25 nats per dimension (4 nats a sequence) cost 1% more than the word
# dropout alone (commit 1847dc9): at 800 steps the encoder has less than that to say, so the floor buys KL
# that the decoder does not use.
QUICK = dict(seq_len=64, d=256, latent=16, batch=32, steps=800, lr=3e-3, eval_batches=16, iw_samples=16,
             word_dropout=0.025, free_bits=0.1)
FULL = dict(seq_len=128, d=512, latent=32, batch=64, steps=20_000, lr=1e-3, eval_batches=128, iw_samples=64,
            word_dropout=0.25, free_bits=0.25)

# Row name -> (label, VAE settings). The settings are complete for every VAE
# row (none inherits the config file's defaults), so a row means what it says.
ROWS = {
    "vae": ("VAE, no tricks", dict(schedule="constant", wd=False, fb=False)),
    "vae_anneal": ("+ KL annealing", dict(schedule="linear", wd=False, fb=False)),
    "vae_anneal_wd": ("+ word dropout", dict(schedule="linear", wd=True, fb=False)),
    "vae_anneal_wd_fb": ("+ free bits", dict(schedule="linear", wd=True, fb=True)),
    "vae_cyclical": ("cyclical annealing", dict(schedule="cyclical", wd=False, fb=False)),
}


def _points(preset: dict, extra: dict) -> list[sweep.Point]:
  steps = preset["steps"]
  common = {
      "data.seq_len": preset["seq_len"], "data.batch_size": preset["batch"], "model.d": preset["d"],
      "model.layers": 1, "optim.lr": preset["lr"], "optim.warmup_steps": max(steps // 16, 1),
      "train.steps": steps, "train.eval_every": steps, "train.eval_batches": preset["eval_batches"],
      "train.log_every": max(steps // 16, 1), "train.checkpoint_every": max(steps // 2, 1), **extra,
  }
  points = [sweep.Point(name="lstm_lm", config=LM, overrides=dict(common),
                        labels={"row": "lstm_lm", "label": "LSTM LM"})]
  for name, (label, s) in ROWS.items():
    # Linear: beta reaches 1 halfway. Cyclical: 4 cycles (Fu et al. 2019), beta rising over each one's first half.
    warmup = steps // 4 if s["schedule"] == "cyclical" else steps // 2
    overrides = {**common, "model.latent_dim": preset["latent"], "model.iw_samples": preset["iw_samples"],
                 "model.kl_schedule": s["schedule"], "model.kl_warmup_steps": warmup,
                 "model.word_dropout": preset["word_dropout"] if s["wd"] else 0.0,
                 "model.free_bits": preset["free_bits"] if s["fb"] else 0.0}
    points.append(sweep.Point(name=name, config=VAE, overrides=overrides, labels={"row": name, "label": label}))
  return points


def quick_grid() -> list[sweep.Point]:
  return _points(QUICK, {"mesh.num_devices": 1})


def full_grid() -> list[sweep.Point]:
  return _points(FULL, {})


def record_extra(config, result: dict) -> dict:
  """Bytes per token, and for a VAE the active units over the whole evaluation sample.

  The evaluation's `active_units` is a mean of per-batch counts (the variance
  of E_q[z] over one batch's sequences); Burda et al. define it over the data
  set, so it is recomputed here over every sequence the evaluation scored.
  """
  import jax
  import numpy as np
  from flax import nnx
  from wm import evaluation, parallel, step as step_lib
  from wm.data import pipeline
  from wm.models import latent

  extra = {"bytes_per_token": pipeline.bytes_per_token(config)}
  if config.model.name != "vae":
    return extra
  setup = step_lib.make_setup(config)
  model = step_lib.model_from_state(setup, result["state"])
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, tokens, weights):
    return nnx.merge(graphdef, state).encode(tokens, weights)[0]

  means, masks = [], []
  with parallel.activate(setup.mesh, setup.rules):
    for local in evaluation.eval_batches(config):  # the sequences evaluation.evaluate scored, padding rows weight 0
      batch = step_lib.global_batch(setup, local)
      means.append(np.asarray(encode(state, batch["targets"], batch["weights"])))
      masks.append(np.any(local["weights"] > 0, axis=1))
  mu, mask = np.concatenate(means), np.concatenate(masks)
  active = latent.active_units(mu, mask.astype(np.float32))
  var = np.var(mu[mask], axis=0)
  return {**extra, "active_units": int(active), "latent_dim": int(config.model.latent_dim),
          "posterior_mean_variance": [float(v) for v in var], "active_units_sequences": int(mask.sum())}


def summary(record: dict) -> dict:
  """The table's numbers of one record, in nats per sequence and bits per byte."""
  ev = record["eval"]
  per_seq = ev["eval_tokens"] / ev["eval_examples"]  # scored tokens per sequence
  bpt = record.get("bytes_per_token") or 1.0
  if record["row"] == "lstm_lm":
    nll_token = ev["nll"]  # exact
    return {"nll": nll_token * per_seq, "elbo_nll": None, "kl": None, "active": None,
            "bits_per_byte": nll_token / math.log(2) / bpt, "nll_token": nll_token}
  nll_token = ev["iw_nll_per_token"]
  return {"nll": nll_token * per_seq, "elbo_nll": ev["nll"] * per_seq, "kl": ev["kl"],
          "kl_analytic": ev.get("kl_analytic"), "active": record.get("active_units"),
          "bits_per_byte": nll_token / math.log(2) / bpt, "nll_token": nll_token}


def plot(records: list[dict], out: str, preset: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  order = ["lstm_lm", *ROWS]
  records = sorted(records, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
  sums = [summary(r) for r in records]
  lm = next((s for r, s in zip(records, sums) if r["row"] == "lstm_lm"), None)
  labels = [r["label"] for r in records]

  fig, (ax_n, ax_k) = plt.subplots(1, 2, figsize=(10, 3.6))
  y = range(len(records))
  ax_n.barh(y, [s["nll"] for s in sums], color=["gray" if r["row"] == "lstm_lm" else "C0" for r in records])
  ax_n.barh(y, [s["elbo_nll"] - s["nll"] if s["elbo_nll"] else 0 for s in sums],
            left=[s["nll"] for s in sums], color="C1", alpha=0.5, label="-ELBO minus IW bound")
  if lm:
    ax_n.axvline(lm["nll"] * 1.02, color="red", lw=0.8, ls="--", label="LM + 2%")
  ax_n.set_yticks(list(y), labels)
  ax_n.invert_yaxis()
  lo = min(s["nll"] for s in sums)
  ax_n.set_xlim(lo * 0.97, max((s["elbo_nll"] or s["nll"]) for s in sums) * 1.01)
  ax_n.set_xlabel("validation NLL (nats per sequence; VAE: IW bound)")
  ax_n.legend(fontsize=7)
  ax_k.barh(y, [s["kl"] or 0 for s in sums], color="C2")
  for i, s in enumerate(sums):
    if s["active"] is not None:
      ax_k.annotate(f"{s['active']} active", (s["kl"] or 0, i), textcoords="offset points", xytext=(3, -3),
                    fontsize=7)
  ax_k.set_yticks(list(y), [""] * len(records))
  ax_k.invert_yaxis()
  ax_k.set_xlabel("KL(q(z|x) || p(z)) (nats per sequence)")
  tokens = records[0]["overrides"].get("data.seq_len")
  fig.suptitle(f"Sequence VAEs against an LSTM LM ({preset}: {tokens}-byte sequences, {records[0]['steps']} steps, "
               f"d={records[0]['model']['d']})", fontsize=10)
  fig.tight_layout()
  sweep.save_figure(fig, out, "vae_table")

  header = ["model", "NLL (nats/seq)", "vs LM", "-ELBO", "KL", "active units", "bits/byte", "params", "tokens/s"]
  rows = []
  for r, s in zip(records, sums):
    vs = f"{100 * (s['nll'] / lm['nll'] - 1):+.2f}%" if lm and r["row"] != "lstm_lm" else ""
    rows.append([r["label"], f"{s['nll']:.2f}", vs, "" if s["elbo_nll"] is None else f"{s['elbo_nll']:.2f}",
                 "" if s["kl"] is None else f"{s['kl']:.3f}",
                 "" if s["active"] is None else f"{s['active']}/{r['latent_dim']}",
                 f"{s['bits_per_byte']:.4f}", f"{r['param_count'] / 1e6:.2f}M",
                 f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""])
  ev = records[0]["eval"]
  iw = next((r["overrides"].get("model.iw_samples") for r in records if r["row"] != "lstm_lm"), None)
  note = (f"Validation sample: {ev['eval_examples']} sequences, {ev['eval_tokens']} scored bytes, the same for "
          f"every row. NLL: the LM's exact NLL; a VAE's importance-weighted bound with {iw} samples (Burda et al. "
          f"2016), an upper bound on its NLL; -ELBO the looser single-code bound; KL in nats per sequence (Monte "
          f"Carlo, the same samples); active units: Var_x E_q[z_u] > 0.01 over the whole sample. Bits/byte from "
          f"the same NLL. jax {records[0]['jax_version']}, {records[0]['backend']} ({records[0]['device_kind']}).")
  print(sweep.write_table(out, header, rows, align="lrrrrrrrr", note=note))


def main(argv=None) -> int:
  return sweep.main("vae_table", {"quick": quick_grid, "full": full_grid}, plot, description=__doc__,
                    record_extra=record_extra, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
