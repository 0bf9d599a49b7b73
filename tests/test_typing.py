"""The shape annotations of wm.models (wm/typing.py notation) are checked, not only written.

jaxtyping's import hook wraps every annotated function and method of
wm.models in a beartype check of dtypes and named dimensions (a `d` bound by
one argument must match the `d` of the next, `4*d` is four times it). The
hook only acts on modules imported after it is installed, and the other test
modules import wm.models first, so the models are built and run in a fresh
interpreter: each family's forward pass, training and evaluation loss, and
generation, traced under jax.jit as the train step traces them (the checks
run on the tracers' shapes at trace time).
"""

import json
import os
import subprocess
import sys

import pytest

FAMILIES = ("lstm", "transformer", "vae", "mixture", "vrnn")

# Runs in the child interpreter: one JSON line per check, {"check", "error"} (error None when it passed).
CHILD = r"""
import json
import jaxtyping

with jaxtyping.install_import_hook(["wm.models"], "beartype.beartype"):
  import wm.models
  from wm.models import layers

import functools
import jax
import jax.numpy as jnp
from flax import nnx
from wm.config import base_config

FAST = {"xla_backend_optimization_level": 0}  # as tests/test_models.py: half the compile time, same HLO


def config(name):
  c = base_config()
  c.model.name = name
  c.data.vocab_size, c.data.seq_len = 37, 16
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads, c.model.mlp_ratio = 16, 2, 4, 2, 2
  c.model.latent_dim, c.model.components, c.model.iw_samples = 4, 2, 2
  c.model.dropout = c.model.word_dropout = 0.1  # the dropout paths are annotated too
  return c


def jit(fn):
  # fn(model, *args) traced with the model passed as (static graph, state), as wm.step does.
  @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
  def run(graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)
  return lambda model, *args: run(*nnx.split(model), *args)


def report(check, fn):
  try:
    jax.block_until_ready(fn())
    error = None
  except Exception as e:  # the child reports every failure; the test names them
    error = f"{type(e).__name__}: " + "\n".join(str(e).splitlines()[:6])
  print(json.dumps({"check": check, "error": error}), flush=True)


tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 37)
batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
         "weights": jnp.ones((2, 16), jnp.float32).at[1, 9:].set(0.0)}
rngs = lambda: nnx.Rngs(params=1, dropout=2, latent=3, sample=4)

for name in FAMILIES:
  model = wm.models.build(config(name), nnx.Rngs(0))
  report(f"{name}.loss(train=True)", lambda: jit(lambda m, b: m.loss(b, train=True, rngs=rngs()))(model, batch))
  report(f"{name}.loss(train=False)", lambda: jit(lambda m, b: m.loss(b, train=False, rngs=rngs()))(model, batch))
  if name in ("lstm", "transformer"):
    report(f"{name}.__call__", lambda: jit(lambda m, t: m(t))(model, tokens))
    start = (lambda m: m.init_state(2)) if name == "lstm" else (lambda m: m.init_cache(2, 16))
    report(f"{name}.decode_step", lambda: jit(lambda m, t: m.decode_step(t, start(m)))(model, tokens[:, 0]))
  else:
    report(f"{name}.sample", lambda: jit(lambda m: m.sample(rngs(), 2, 4))(model))

# The other annotated paths: chunked windowed attention, shared layers with LoRA adapters, and the
# LSTM's time-chunked loss under remat (both train steps trace them, from other config fields).
variants = {
    "transformer": {"model.attention": "chunked", "model.attention_block": 4, "model.window": 8,
                    "model.share_layers": 2, "model.lora_rank": 2, "remat.policy": "full"},
    "lstm": {"remat.time_chunk": 4, "remat.policy": "save:h", "model.share_layers": 2, "model.lora_rank": 2},
}
for name, fields in variants.items():
  c = config(name)
  for field, value in fields.items():
    section, key = field.split(".")
    c[section][key] = value
  model = wm.models.build(c, nnx.Rngs(0))
  report(f"{name}.loss(train=True) with {sorted(fields)}",
         lambda: jit(lambda m, b: nnx.grad(lambda m: m.loss(b, train=True, rngs=rngs())[0])(m))(model, batch))

# The checks are live: targets one step longer than the logits are refused before any arithmetic.
def wrong_shape():
  layers.lm_loss(jnp.zeros((2, 16, 37)), jnp.zeros((2, 17), jnp.int32), jnp.ones((2, 16)))
try:
  wrong_shape()
  error = "lm_loss accepted targets [2, 17] for logits [2, 16, 37]"
except jaxtyping.TypeCheckError:
  error = None
print(json.dumps({"check": "a wrong shape is refused", "error": error}), flush=True)
"""


@pytest.fixture(scope="module")
def checked_run():
  """{check: error or None} from one child interpreter with the import hook installed."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  code = f"FAMILIES = {FAMILIES!r}\n" + CHILD
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                        timeout=1200)
  results = {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      results[record["check"]] = record["error"]
  if proc.returncode != 0:
    pytest.fail(f"the checked child exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
  return results


def test_every_model_family_runs_with_its_annotations_checked(checked_run):
  # One test, not one per family: under pytest-xdist each worker that ran a family's test would start its
  # own checked interpreter (about 25 s of imports and traces each).
  problems = []
  for name in FAMILIES:
    ran = {check: error for check, error in checked_run.items() if check.startswith(name + ".")}
    expected = {"lstm": 5, "transformer": 5}.get(name, 3)  # two losses, generation; an LM's forward and variant
    if len(ran) != expected:
      problems.append(f"expected {expected} checks of {name}, got {sorted(ran)}")
    problems += [f"{check}:\n{error}" for check, error in ran.items() if error]
  assert checked_run["a wrong shape is refused"] is None, checked_run["a wrong shape is refused"]
  assert not problems, "\n\n".join(problems)
