"""TrainConfig: the single source of gate-training options for the CLI, the worker and the nodes."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from mole_core import GateConfig, MoleError
from mole_core.checks import check_number
from mole_core.gates import FAMILIES, GATE_INPUTS, NEGATIVE_ROUTING, TEXT_POOLS
from mole_core.naming import GRANULARITIES

from .greedy import share_steps_up_to

OBJECTIVES = ("denoise", "clip", "compose")
DTYPES = ("fp32", "bf16")
MAX_RESOLUTION = 8192
MAX_STEPS = 1_000_000  # gate training converges in hundreds
AGGREGATES = ("mean", "wins")  # block search: how a change's paired samples are weighed (see block_search)
BY_SET = ("off", "own", "refine")  # block search: one stage choice for every set, or per set (see block_search)
_KINDS = ((bool, bool, "true or false"), (int, int, "a whole number"), (float, (int, float), "a number"),
          (str, str, "text"))  # bool first: a bool is an int too


def _opt(default, help_: str, **extra):  # noqa: ANN001
    return field(default=default, metadata={"help": help_, **extra})


@dataclass
class TrainConfig:
    """Options of one gate-training run (paper §3.3/Eq. 16: only gates train)."""

    steps: int = _opt(200, "optimizer steps")
    lr: float = _opt(5e-3, "AdamW learning rate of the gates")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(10, "linear learning-rate warm-up steps")
    lr_schedule: str = _opt("constant", "after warm-up: constant | cosine (decay to 0 at the last step: the "
                            "routers settle instead of following the last noisy batches)",
                            choices=("constant", "cosine"))
    grad_clip: float = _opt(1.0, "clip the gates' gradient norm to this (0: off)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    batch_size: int = _opt(2, "images per micro-batch (global, split across torchrun ranks)")
    alpha: float = _opt(0.5, "weight α of the gating balance loss (paper Eq. 16)")
    granularity: str = _opt("block", "gate scope: matrix | layer | block | network", choices=GRANULARITIES)
    gate_input: str = _opt("input", "gate features: input (pooled block input) | experts (pooled expert outputs) | "
                           "prompt (max-pooled prompt conditioning: routes by the concepts named in the prompt) | "
                           "router (one router on the text encoder's first-layer tokens decides per prompt for "
                           "every scope; needs train_text_gates) | trigger (each LoRA on when the word its file is "
                           "named after is in the prompt, every scope scales each LoRA; sigmoid family, needs "
                           "train_text_gates)",
                           choices=GATE_INPUTS)
    gate_family: str = _opt("softmax", "softmax: the paper's convex gates (sum to 1) | sigmoid: each expert on/off "
                            "on its own times a learnable per-scope magnitude in [0, m_max]", choices=FAMILIES)
    m_max: float = _opt(2.0, "sigmoid gates: upper bound of the per-scope magnitude")
    init_gate: float = _opt(0.5, "sigmoid gates: every expert's gate at the start")
    train_magnitudes: bool = _opt(True, "sigmoid gates: train the per-scope magnitudes; off: they stay where they "
                                  "start (gate_input trigger: 1, the LoRA's own strength) and only the routers "
                                  "learn (on the toy benchmark its guide lowers composition when it moves them)")
    text_pool: str = _opt("mean", "text-encoder gates pool token states by mean | max (max routes by trigger words) "
                          "| tokens (every token scored, each expert's largest logit kept: at the first layer a "
                          "trigger word's score does not depend on the words around it)", choices=TEXT_POOLS)
    token_routing: bool = _opt(False, "prompt-reading gates score every token and keep each expert's largest "
                               "logit (a trigger word anywhere in the prompt switches its LoRA)")
    negative_routing: str = _opt("own", "gate_input router | trigger, under classifier-free guidance: own — the "
                                 "negative prompt's UNet rows route by the negative prompt (a named LoRA runs in "
                                 "the prompt's branch only, its effect scaled by the CFG scale); positive — they "
                                 "take their prompt's routes (the named LoRAs run in both branches, like loaded "
                                 "LoRAs)", choices=NEGATIVE_ROUTING)
    center_features: bool = _opt(False, "centre every gate's features on the training prompts' mean (one pass "
                                 "before training), so the router weights learn what differs between prompts")
    tau_init: float = _opt(1.0, "initial softmax temperature τ")
    strength: float = _opt(1.0, "mixture strength λ while training (use the same when sampling); N experts with "
                           "λ = N start as every LoRA at full strength instead of NLA's 1/N")
    objective: str = _opt("denoise", "comma list of objectives: denoise, clip, compose (sample composed prompts, "
                          "score them with an image-text guide; see README)")
    rollout_steps: int = _opt(4, "compose: DDIM steps per training rollout (gradient through the last one)")
    grad_step: str = _opt("random", "compose: rollout step the gradient flows through: random (one per training "
                          "step) | last (the official code's truncation)", choices=("random", "last"))
    rollout_cfg: float = _opt(5.0, "compose: classifier-free guidance scale of the rollouts")
    global_weight: float = _opt(1.0, "compose: weight of the image–composed-prompt similarity term")
    local_weight: float = _opt(0.5, "compose: weight of the image–named-concept-references similarity term")
    prior_weight: float = _opt(1.0, "compose: weight of the base-prompt prior preservation term")
    exclude_weight: float = _opt(0.0, "compose: weight of the exclusion term: no image may look more like a concept "
                                 "its prompt does not name than the base model's image does (per-concept "
                                 "routing signal; scores every row, +1 base-model call per step)")
    route_weight: float = _opt(0.0, "compose with gate_input router or trigger: weight of the naming term, the binary "
                               "cross-entropy between each LoRA's router decision and whether the prompt names its "
                               "concept (the concept named like the LoRA file: purple.safetensors ↔ purple)")
    twin_prior: bool = _opt(True, "compose: half of each batch's composition slots are the compositions' twins "
                            "(concept words removed, same noise) under the prior term: the two terms then differ "
                            "only in the trigger words, which is what the gates must learn to read")
    word_dropout: float = _opt(0.0, "compose: drop each word of a composition prompt that names no concept with "
                               "this probability (the routers must then read the trigger words)")
    block_search: bool = _opt(False, "compose with gate_input trigger: after training, switch each LoRA off in the "
                              "UNet stages (down_blocks.i, mid_block, up_blocks.i) where the guide scores the "
                              "compositions that name it higher without it (greedy, one pass; see README)")
    search_prompts: int = _opt(16, "block search: composition prompts scored per set of named concepts")
    search_steps: int = _opt(12, "block search: DDIM steps of each scored image")
    search_batch: int = _opt(16, "block search: images sampled at once (lower it when memory is short; the noise "
                             "stays the same)")
    search_text_strengths: str = _opt("", "block search, then: comma-separated text-encoder magnitudes to try per "
                                      "LoRA (e.g. 1.5,2,2.5; each below m_max); each LoRA keeps the one that raises "
                                      "the guide's score of the compositions naming it most, or its own (empty: off)")
    search_by_set: str = _opt("off", "block search: choose the stages per set of LoRAs a prompt names (each pair "
                              "and the triple its own), stored as per-set scales (gate file version 6): own — each "
                              "set's passes start from every stage on; refine — after the shared passes, each set "
                              "refines the shared choice with one pass of its own; off — one choice for every set",
                              choices=BY_SET)
    search_text_by_set: bool = _opt(False, "block search with search_by_set and search_text_strengths: each set of "
                                    "LoRAs a prompt names chooses its own text-encoder magnitudes (per-set scales on "
                                    "the text-encoder scopes) instead of one choice for every set")
    search_rounds: int = _opt(1, "block search: stage passes; each after the first runs with the text-encoder "
                              "magnitudes the text pass chose and may switch a stage back on")
    search_windows: bool = _opt(False, "block search: each stage pass chooses every LoRA's contiguous window of "
                                "UNet stages (first its start, then its end; 2 × stages candidates per LoRA) instead "
                                "of flipping one stage at a time")
    search_draws: int = _opt(1, "block search: noise draws each change is scored on; a change is kept only when it "
                             "raises the guide's score on every draw (the later draws are sampled only for changes "
                             "that raise the first's; 1: one draw)")
    search_aggregate: str = _opt("mean", "block search: how a change is judged from its samples (every candidate "
                                 "sees the same prompts and noise): mean — the guide's mean score rises; wins — more "
                                 "samples score higher than lower (a few samples that fall a lot cannot outvote "
                                 "most that rise a little)", choices=AGGREGATES)
    search_dark_view: float = _opt(0.0, "block search: also score each image with its near-black pixels (summed RGB "
                                   "below this share of the image's bright level) set to its border colour, and "
                                   "keep the worse score: detail that only shows as near-black merges with a dark "
                                   "background (0: off; the benchmark's recipe: 0.25)")
    search_texture_weight: float = _opt(0.0, "block search: add this weight × a texture term to each image's score: "
                                        "minus the distance of the Gram matrix of the guide's convolutional features "
                                        "to the mean of the named concepts' references' (train.texture); tells "
                                        "regular stripes from broken ones, which the image-text score barely does "
                                        "(0: off; the compose recipe: 0.1; needs the toy CLIP or an open_clip "
                                        "guide)")
    search_min_strength: float = _opt(0.0, "block search: a LoRA the prompt names is never switched fully off: "
                                      "its switched-off stages run it at the lowest strength that keeps its mean "
                                      "magnitude over the UNet's gated scopes at this value, and the search scores "
                                      "every choice so (0: off means off; in [0, 1])")
    search_place_floors: bool = _opt(False, "block search with search_min_strength: a last pass where a LoRA's "
                                     "switched-off stages may run it at 0 instead of its floor, its other "
                                     "switched-off stages carrying the strength (up to full; the mean stays at "
                                     "search_min_strength): one stage at a time, the one whose zeroing raises the "
                                     "guide's score most, until none does")
    search_share_floors: bool = _opt(False, "block search with search_min_strength and search_by_set: a pass (before "
                                     "search_place_floors) where the compositions naming a LoRA share its floor — "
                                     "one set keeps less of it (0.1–0.3 less) and the others more, the mean over "
                                     "them staying at search_min_strength (the mean the routing target measures) — "
                                     "per LoRA the share that raises the guide's score most, or none (a prompt "
                                     "naming one LoRA keeps its floor)")
    search_share_max_step: float = _opt(0.3, "block search with search_share_floors: the most one set's share of a "
                                        "floor may fall below search_min_strength (steps of 0.1 up to this; the "
                                        "others rise by as much in sum, each to at most full strength)")
    search_compositions_only: bool = _opt(False, "block search: score and choose for the sets of two or more LoRAs "
                                          "only; a prompt naming one LoRA runs it in every stage at its own "
                                          "strength, as loaded (with search_by_set; without it the shared choice, "
                                          "made on the compositions, serves every prompt). About a fifth fewer "
                                          "images to sample with three LoRAs")
    base_share: float = _opt(0.33, "compose: share of each batch drawn from the base prompts (when given)")
    denoise_weight: float = _opt(1.0, "weight of the denoising loss")
    clip_image_weight: float = _opt(1.0, "weight of the CLIP image–image term")
    clip_text_weight: float = _opt(1.0, "weight of the CLIP image–text term")
    clip_max_t: float = _opt(0.4, "CLIP terms only for timesteps t/T below this (low-noise window)")
    clip_decode_size: int = _opt(128, "pixel size the predicted x0 is decoded at for CLIP")
    t_min: float = _opt(0.0, "lowest training timestep, as a fraction of T")
    t_max: float = _opt(1.0, "highest training timestep, as a fraction of T")
    resolution: int = _opt(512, "training resolution in pixels (images are resized and center-cropped)")
    random_crop: bool = _opt(False, "random instead of center crop")
    seed: int = _opt(0, "seed: same seed, same data ⇒ bit-identical gates on CPU")
    dtype: str = _opt("fp32", "autocast dtype of the denoiser: fp32 | bf16", choices=DTYPES)
    gradient_checkpointing: bool = _opt(False, "recompute denoiser activations in backward (less memory)")
    train_text_gates: bool = _opt(False, "also gate the text encoder (re-encodes prompts every step)")
    checkpoint_every: int = _opt(50, "write a resumable checkpoint every K steps (0: only at the end)")
    prompt: str = _opt("", "global prompt for images without a caption file or folder prompt")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            self._check_type(f.name, value, f.default)
            if choices is not None and value not in choices:
                raise MoleError(f"`{f.name}` must be one of {tuple(choices)}, got {value!r}")
            if isinstance(getattr(self, f.name), float):  # every number finite (NaN/inf: NaN gates or no end)
                check_number(getattr(self, f.name), f"`{f.name}`", lo=-1e6, hi=1e6)
        if self.steps <= 0:
            raise MoleError(f"`steps` must be > 0, got {self.steps}")
        if self.steps > MAX_STEPS:
            raise MoleError(f"`steps` must be at most {MAX_STEPS}, got {self.steps}")
        if self.lr <= 0:
            raise MoleError(f"`lr` must be > 0, got {self.lr}")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise MoleError(f"`batch_size` and `grad_accum` must be > 0, got {self.batch_size}, {self.grad_accum}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise MoleError(f"`objective` must be a comma list of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise MoleError(f"need 0 ≤ t_min < t_max ≤ 1, got {self.t_min}, {self.t_max}")
        if self.resolution < 8 or self.resolution % 8 or self.resolution > MAX_RESOLUTION:
            raise MoleError(f"`resolution` must be a positive multiple of 8 up to {MAX_RESOLUTION}, "
                            f"got {self.resolution}")
        if self.checkpoint_every < 0 or self.warmup_steps < 0:
            raise MoleError(f"`checkpoint_every` and `warmup_steps` must be ≥ 0, got {self.checkpoint_every}, "
                            f"{self.warmup_steps}")
        if self.strength <= 0:
            raise MoleError(f"`strength` must be > 0, got {self.strength}")
        if self.alpha < 0:
            raise MoleError(f"`alpha` must be ≥ 0, got {self.alpha}")
        if self.rollout_steps < 1:
            raise MoleError(f"`rollout_steps` must be ≥ 1, got {self.rollout_steps}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise MoleError(f"`word_dropout` must be in [0, 1), got {self.word_dropout}")
        if not 0.0 <= self.base_share < 1.0:
            raise MoleError(f"`base_share` must be in [0, 1), got {self.base_share}")
        routed = self.gate_input in ("router", "trigger")
        if self.route_weight < 0 or (self.route_weight > 0 and not routed):
            raise MoleError(f"`route_weight` must be ≥ 0 and needs `gate_input` router or trigger, got "
                            f"{self.route_weight} with {self.gate_input!r}")
        if routed and not self.train_text_gates:
            raise MoleError(f"`gate_input` {self.gate_input} needs `train_text_gates` (the router reads the text "
                            "encoder's first layer and trains with the text-encoder gates)")
        if self.block_search and (self.gate_input != "trigger" or "compose" not in self.objectives):
            raise MoleError(f"`block_search` needs objective compose and gate_input trigger, got objective "
                            f"{self.objective!r} with {self.gate_input!r}")
        if min(self.search_prompts, self.search_steps, self.search_batch) < 1:
            raise MoleError(f"`search_prompts`, `search_steps` and `search_batch` must be ≥ 1, got "
                            f"{self.search_prompts}, {self.search_steps}, {self.search_batch}")
        if self.search_rounds < 1 or (self.search_rounds > 1 and not self.block_search):
            raise MoleError(f"`search_rounds` must be ≥ 1 (above 1 needs `block_search`), got {self.search_rounds} "
                            f"with block_search {self.block_search}")
        if self.search_draws < 1 or (self.search_draws > 1 and not self.block_search):
            raise MoleError(f"`search_draws` must be ≥ 1 (above 1 needs `block_search`), got {self.search_draws} "
                            f"with block_search {self.block_search}")
        if self.search_windows and not self.block_search:
            raise MoleError("`search_windows` needs `block_search`")
        if self.search_aggregate != "mean" and not self.block_search:
            raise MoleError(f"`search_aggregate` {self.search_aggregate!r} needs `block_search`")
        if self.search_by_set != "off" and not self.block_search:
            raise MoleError("`search_by_set` needs `block_search`")
        if self.search_text_by_set and (self.search_by_set == "off" or not self.search_text_strengths):
            raise MoleError(f"`search_text_by_set` needs `search_by_set` own or refine and `search_text_strengths`, "
                            f"got search_by_set {self.search_by_set!r} and search_text_strengths "
                            f"{self.search_text_strengths!r}")
        if self.search_text_strengths and not self.block_search:
            raise MoleError("`search_text_strengths` needs `block_search` (it is the search's second pass)")
        if self.search_dark_view and not (self.block_search and 0.0 < self.search_dark_view < 1.0):
            raise MoleError(f"`search_dark_view` must be in (0, 1) and needs `block_search`, got "
                            f"{self.search_dark_view} with block_search {self.block_search}")
        if self.search_texture_weight and not (self.block_search and self.search_texture_weight > 0):
            raise MoleError(f"`search_texture_weight` must be ≥ 0, and above 0 it needs `block_search`, got "
                            f"{self.search_texture_weight} with block_search {self.block_search}")
        if self.search_min_strength and not (self.block_search and 0.0 < self.search_min_strength <= 1.0
                                             and self.search_min_strength < self.m_max):
            raise MoleError(f"`search_min_strength` must be in [0, 1] and below m_max {self.m_max}, and above 0 "
                            f"needs `block_search`, got {self.search_min_strength} with block_search "
                            f"{self.block_search}")
        if self.search_place_floors and not self.search_min_strength:
            raise MoleError("`search_place_floors` needs `search_min_strength` above 0 (it moves the floors)")
        if self.search_share_floors and not (self.search_min_strength and self.search_by_set != "off"):
            raise MoleError(f"`search_share_floors` needs `search_min_strength` above 0 and `search_by_set` own or "
                            f"refine, got {self.search_min_strength} and {self.search_by_set!r}")
        if self.search_share_max_step != 0.3 and not self.search_share_floors:
            raise MoleError(f"`search_share_max_step` needs `search_share_floors`, got {self.search_share_max_step}")
        share_steps_up_to(self.search_share_max_step, "`search_share_max_step`")
        if self.search_compositions_only and not self.block_search:
            raise MoleError("`search_compositions_only` needs `block_search`")
        for level in self.text_strengths:
            if not 0 < level < self.m_max:
                raise MoleError(f"`search_text_strengths` values must be in (0, m_max {self.m_max}), got {level}")
        if not self.train_magnitudes and self.gate_family != "sigmoid":
            raise MoleError("`train_magnitudes` off needs gate_family sigmoid (softmax gates have no magnitude)")
        self.gate_config()  # family, m_max, init_gate, text_pool, tau: one-line errors now

    @property
    def text_strengths(self) -> tuple[float, ...]:
        """``search_text_strengths`` as numbers (one-line error on anything else)."""
        parts = [p.strip() for p in self.search_text_strengths.split(",")] if self.search_text_strengths else []
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            raise MoleError(f"`search_text_strengths` must be comma-separated numbers, e.g. 1.5,2,2.5, got "
                            f"{self.search_text_strengths!r}") from None

    def gate_config(self) -> GateConfig:
        """The gates' shape for this run."""
        return GateConfig(granularity=self.granularity, gate_input=self.gate_input, tau_init=self.tau_init,
                          family=self.gate_family, m_max=self.m_max, init_gate=self.init_gate,
                          text_pool=self.text_pool, token_routing=self.token_routing,
                          negative_routing=self.negative_routing)

    @property
    def objectives(self) -> list[str]:
        return [o.strip() for o in self.objective.split(",") if o.strip()]

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def _check_type(name: str, value: object, default: object) -> None:
        """A field's value has its default's type (an int field takes a whole number, a bool field a bool)."""
        for kind, accepts, words in _KINDS:
            if isinstance(default, kind):
                if not isinstance(value, accepts) or (kind is not bool and isinstance(value, bool)):
                    raise MoleError(f"`{name}`: {words} is expected, got {value!r}")
                return

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def config_fields() -> list[tuple[str, object, str, tuple | None]]:
    """``(name, default, help, choices)`` of every option (CLI flags are built from these)."""
    out = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        out.append((f.name, default, f.metadata.get("help", ""), f.metadata.get("choices")))
    return out
