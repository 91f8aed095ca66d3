"""Evaluation protocols by name: which audio becomes features, how the probe is trained and how the
test split is scored (``evaluate.py probe/sweep --protocol NAME``).

``musicssl`` (the default) - this project's protocol, for comparing encoders and baselines on one
footing: whole-clip embeddings (CLMR: crops averaged; wav2vec2 / CPC: mean over frames), every
BatchNorm's statistics recomputed on clean training crops (so a random init is not judged by its
default statistics), features standardised with the training mean and std (one learning rate
suits log-mel statistics and networks alike), a linear probe or an MLP (512, ReLU, dropout 0.2)
with Adam 1e-3, batch 64, up to 200 epochs, early stopping after 20 epochs without a better valid
primary metric (ties go to the lower valid loss), the best epoch's weights, and for wav2vec2
``--layer all`` one probe per layer with the best layer chosen on valid. It is the default because
it is defined for every encoder and baseline here and selects on the metric it reports.

``clmr`` - Spijkervet/CLMR ``linear_evaluation.py`` with ``clmr/modules/linear_evaluation.py``,
``clmr/evaluation.py``, ``clmr/data.py`` and ``config/config.yaml`` at commit
423414d086350d04fd46e48bc74af30a208eff90: training and valid features from one random crop per
clip (``RandomResizedCrop(n_samples=audio_length)``, 59049 samples; clips shorter than the crop are
left out, as ``ContrastiveDataset`` skips them), the checkpoint's own BatchNorm statistics
(``cl.eval()``, no recalibration), raw unstandardised features, ``nn.Linear`` (``--probe mlp``:
Linear-ReLU-Linear of the feature width, no dropout), Adam lr 1e-3 with weight decay 1e-6, batch
48 (``batch_size``), ``ReduceLROnPlateau(mode="min", factor=0.1, patience=5, threshold=1e-4)`` and
``EarlyStopping(patience=10)`` both on the valid loss, at most 200 epochs
(``finetuner_max_epochs``), and the weights of the last epoch (``trainer.fit`` restores no
checkpoint before ``evaluate``). Test: every clip cut with ``torch.split`` into 59049-sample crops
with the last chunk dropped (``concat_clip``), and the clip's prediction the mean over its crops of
the per-crop *sigmoid* outputs (softmax for single-label tasks); macro ROC-AUC / PR-AUC, accuracy.
Departures: a clip of at most one crop keeps one zero-padded crop (the original yields none and
fails); the crop length of a non-CLMR encoder is 59049 samples too.

``marble`` - the MARBLE benchmark's probe, a43992899/MARBLE-Benchmark at commit
d9300e335eefdad8d6b825418e8c44b22d0919c7 (``benchmark/models/probers.py``
``ProberForBertUtterCLS``, ``benchmark/utils/get_callbacks.py``, ``benchmark/probe.py``,
``benchmark/tasks/MTT/MTT_base_config.yaml``): features extracted once in eval mode (no
recalibration), whole-clip mean over time, unstandardised; for ``--layer all`` a learned
softmax-weighted sum over the transformer layers (layer 0, the transformer input, excluded;
``FeatureDataset`` takes ``feature[1:]``); an MLP with one hidden layer of 512, ReLU, dropout 0.2
(``--probe linear``: ``hidden_layer_sizes: []``); Adam without weight decay, batch 64, at most 100
epochs (the MTT config; the NSynth configs say 50: pass ``--max-epochs 50``),
``ReduceLROnPlateau(mode="max", factor=0.5, patience=3)`` and ``EarlyStopping(patience=10)`` on the
valid primary metric (``valid_aucroc`` / ``valid_acc``), the test scored with the best checkpoint
(``ModelCheckpoint(save_top_k=1)``); the learning rate chosen on valid from the configs'
``hp_search.search_list`` 1e-2, 5e-3, 1e-3, 5e-4, 1e-4 (MARBLE's grid search; ``--lr`` fixes one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eval_tools.extract import View
from eval_tools.probe import ProbeConfig
from pipeline.errors import UserError

CLMR_AUDIO_LENGTH = 59049  # config/config.yaml audio_length
MARBLE_LRS = (1e-2, 5e-3, 1e-3, 5e-4, 1e-4)  # hp_search.search_list of the MARBLE task configs


@dataclass(frozen=True, kw_only=True)
class Protocol:
    name: str
    source: str  # one line for --help and results.json
    recalibrate_bn: bool
    probe: ProbeConfig  # the protocol's defaults; lr/epochs/patience/probe may be overridden
    crops: bool = False  # CLMR: random training/valid crops, test scored per crop
    lrs: tuple[float, ...] = ()  # learning rates chosen on valid (empty: probe.lr only)
    per_layer: bool = True  # layer="all": one probe per layer, best on valid (False: a layer mix)

    def views(self, crop: int, seed: int) -> dict[str, View]:
        if not self.crops:
            return {s: View() for s in ("train", "valid", "test")}
        return {"train": View(kind="random_crop", crop=crop, seed=seed), "valid": View(kind="random_crop", crop=crop, seed=seed),
                "test": View(kind="crops", crop=crop)}

    def crop_for(self, enc) -> int:
        """CLMR's crop: the SampleCNN's input length, else CLMR's 59049 samples."""
        return int(enc.window) if enc.arch == "clmr" else CLMR_AUDIO_LENGTH


PROTOCOLS: dict[str, Protocol] = {
    "musicssl": Protocol(
        name="musicssl", source="this project's protocol (eval_tools/protocols.py)", recalibrate_bn=True,
        probe=ProbeConfig(probe="linear", hidden=512, dropout=0.2, standardize=True, lr=1e-3, batch_size=64,
                          max_epochs=200, patience=20, monitor="metric+loss")),
    "clmr": Protocol(
        name="clmr", source="Spijkervet/CLMR linear_evaluation.py @ 423414d086350d04fd46e48bc74af30a208eff90",
        recalibrate_bn=False, crops=True,
        probe=ProbeConfig(probe="linear", hidden=None, dropout=0.0, standardize=False, lr=1e-3, weight_decay=1e-6,
                          batch_size=48, max_epochs=200, patience=10, monitor="loss", plateau=(0.1, 5), restore_best=False)),
    "marble": Protocol(
        name="marble", source="a43992899/MARBLE-Benchmark benchmark/models/probers.py @ d9300e335eefdad8d6b825418e8c44b22d0919c7",
        recalibrate_bn=False, lrs=MARBLE_LRS, per_layer=False,
        probe=ProbeConfig(probe="mlp", hidden=512, dropout=0.2, standardize=False, lr=1e-3, batch_size=64,
                          max_epochs=100, patience=10, monitor="metric", plateau=(0.5, 3), restore_best=True)),
}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"--protocol {name!r}: choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def configure(protocol: Protocol, *, probe: str | None = None, lr: float | None = None, max_epochs: int | None = None,
              patience: int | None = None, seed: int = 0) -> tuple[ProbeConfig, tuple[float, ...]]:
    """The probe config and the learning rates to try, after the user's overrides."""
    if probe == "logreg" and not protocol.per_layer:
        raise UserError(f"--probe logreg fits one layer at a time; --protocol {protocol.name} learns a mix of layers: "
                        "use --protocol musicssl with --probe logreg, or --probe mlp")
    changes = {k: v for k, v in (("probe", probe), ("max_epochs", max_epochs), ("patience", patience)) if v is not None}
    cfg = dataclasses.replace(protocol.probe, seed=seed, **changes)
    if lr is not None:
        return dataclasses.replace(cfg, lr=lr), (lr,)
    return cfg, protocol.lrs or (cfg.lr,)


def check_layer(protocol: Protocol, layer: int | str) -> None:
    if protocol.crops and layer == "all":
        raise UserError("--protocol clmr probes one feature vector per crop: pick one --layer (e.g. -1), not 'all'")
