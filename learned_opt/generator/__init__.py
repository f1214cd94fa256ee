"""G.pt's transformer over network parameters (Peebles et al. 2022, arXiv:2209.12892).

With the layout's ``"chunk"`` tokens (G.pt's) the model reads a sequence of ``2T + 4`` tokens and
predicts clean parameters θ′:

* ``T`` tokens of the starting parameters θ and ``T`` tokens of the noised target x_t, each token
  a chunk of at most ``M`` parameters within one layer (cut by :class:`~learned_opt.layout.Layout`),
  each with its **own** linear encoder (no sharing between tokens);
* one token each for the diffusion timestep t, the current metric l, the prompted metric l′ and
  their difference l′ − l, through sinusoidal frequency embeddings and a small MLP.

Token order: θ tokens, x_t tokens, t, l, l′, l′ − l.

With the layout's ``"neuron"`` tokens (one per hidden unit, :mod:`learned_opt.layout`) the units
of a layer share one encoder, one decoder and one position embedding, and a unit's θ and x_t
encodings are summed into one token (the sequence is ``T + 4`` tokens, the prediction read at the
unit tokens). Permuting the units of the **last** hidden layer in θ and x_t then permutes the
prediction's units the same way (the model is equivariant to them, tested); permuting an earlier
layer also reorders entries inside the next layer's tokens, which shared maps do not undo, so
there the permutation augmentation of training pairs still does the work. On ``mnist-mlp`` (one
hidden layer) every training pair teaches the shared maps ten times, once per unit, and a unit's
outgoing weights sit in the same token as the feature its incoming weights detect.

Learned position embeddings are added, a stack of pre-LayerNorm transformer blocks (non-causal,
``F.scaled_dot_product_attention``) mixes the tokens, and a per-token linear decoder maps the
output tokens at the x_t positions back to parameter chunks. The decoders start at zero.

Two output parameterisations (``GptConfig.precondition``):

* ``False`` (G.pt): the x_t tokens encode x_t itself and the prediction is ``θ + decoded``, so an
  untrained model returns θ exactly. The model knows nothing of the noise schedule: it takes the
  integer step ``t`` as given.
* ``True``: inputs and outputs scaled per parameter and per noise level, around θ (in the spirit
  of Karras et al. 2022, "EDM"). With ``x_t = a θ′ + s ε`` and the update ``θ′ - θ`` of root mean
  square ``σ_p`` for parameter p (the buffer ``residual_scale`` [P], measured on the corpus by the
  trainer and saved with the weights; ``GptConfig.residual_std`` until then), the x_t tokens
  encode ``c_in (x_t - a θ)`` with ``c_in = 1 / sqrt(a² σ² + s²)`` (θ taken out, unit scale at
  every noise level) and the prediction is ``θ + σ · decoded``, elementwise, so the decoded output
  has a unit-scale target and an untrained model still returns θ exactly (unless the subspace
  skip below is on and set up). Training weights each
  x0 error by ``1 / σ_p²`` (:meth:`Gpt.loss_weight`), so a parameter that training barely moves
  counts as much as one it moves a lot. There is no elementwise skip from x_t to the output: an
  update within one token lives mostly in a few directions (on the MNIST corpus 97 % of the
  energy of a hidden unit's 784 incoming weight changes lies in 192 directions), and such a skip
  would let the sampler leave noise of the full per-parameter scale in all the others. With
  ``subspace_skip`` the skip is restricted to those directions: ``decoded`` gets
  ``Π_k(κ ⊙ c_in (x_t - a θ))`` added, where ``κ = a σ c_in`` is the best linear guess of
  ``(θ′ - θ) / σ`` for a unit-variance update and ``Π_k`` projects each token onto its principal
  update directions (the buffer ``skip_basis``, set with the encoders by
  :meth:`Gpt.init_encoders_from_updates`; zero, i.e. no skip, until then). At low noise the model
  then copies the update it sees instead of learning to, and the sampler leaves no noise outside
  the directions where updates live. This variant needs the noise schedule, given as a
  :class:`~learned_opt.diffusion.DiffusionConfig` at construction.

Two optional parts, each off by default and built after the rest (a generator without them is
initialised exactly as before):

* ``GptConfig.null_prompt``: two learned embeddings that replace the prompt's tokens (l′ and
  l′ − l) in the rows where ``forward``'s ``drop_prompt`` is True, trained with prompt dropout, so
  that the same model predicts θ′ without a prompt (given θ and l) for classifier-free guidance
  (:mod:`learned_opt.guidance`);
* ``GptConfig.property_head``: a :class:`~learned_opt.generator.layers.MetricHead` that reads the
  θ encoder's tokens and predicts the normalised metric of clean parameters
  (:meth:`Gpt.predict_metric`), with which an optimizer ranks its own samples.

Modules: ``config`` (:class:`GptConfig`, ``PRESETS``), ``layers`` (the transformer's blocks),
``model`` (:class:`Gpt`, :func:`build_generator`).
"""

from .config import NUM_SCALAR_TOKENS, PRESETS, GptConfig, get_config
from .model import Gpt, build_generator

__all__ = ["NUM_SCALAR_TOKENS", "PRESETS", "Gpt", "GptConfig", "build_generator", "get_config"]
