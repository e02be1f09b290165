"""Data: the resumable batch iterator and the data sources, one module per source.

A data set is a dict of numpy arrays sharing the leading dimension N (``"x"`` for the data,
``"y"`` for integer labels where there are any). Images are NHWC float32 in ``[-1, 1]``.
Nothing is downloaded: every built-in source is made here or ships inside a pip package.
Audio is a (T,) float32 waveform in ``[-1, 1]``; its frame-wise features (log-mel, energy, f0:
:mod:`dpm.data.audio`) share ``1 + T // hop_length`` centred frames.

User data is checked where it enters: :func:`load_npz` and :class:`BatchIterator` refuse NaN or
infinite values (naming the key and the count), :func:`load_npz` refuses values outside its
``value_range`` (default ``(0, 255)`` for integer arrays, ``[-1, 1]`` for float arrays; float
images in 0..255 need ``value_range=(0, 255)``) rather than clipping or rescaling them, and
:func:`load_image_folder` reads 8-bit files only (16-bit and float files are refused).
"""

from dpm.data.audio import (
    MelConfig,
    energy,
    f0,
    griffin_lim,
    griffin_lim_linear,
    interpolate_f0,
    istft,
    linear_magnitude,
    log_mel,
    mel_filterbank,
    mel_to_linear,
    num_frames,
    read_wav,
    stft,
    write_wav,
)
from dpm.data.bundled import (
    SKIMAGE_COLOR_IMAGES,
    SKIMAGE_GRAY_IMAGES,
    random_patches,
    skimage_patches,
)
from dpm.data.captions import (
    CAPTION_MAX_TOKENS,
    CAPTION_TEMPLATES,
    DIGIT_NAMES,
    CaptionVocab,
    attribute_thresholds,
    attribute_words,
    caption_dataset,
    caption_digit,
    digit_attributes,
    digit_captions,
    digit_forms,
    normalize_caption,
)
from dpm.data.digits import load_digits
from dpm.data.faces import (
    FACE_LABELS,
    FACE_REGION,
    HEAD_REGION,
    IDENTITY_TRAIT_NAMES,
    LANDMARK_NAMES,
    NUISANCE_NAMES,
    augment_source,
    face_dataset,
    face_only,
    load_celebamask_hq,
    load_lfw_faces,
    region_mask,
    render_faces,
    sample_identities,
    sample_nuisance,
    tps_warp,
)
from dpm.data.files import IMAGE_EXTENSIONS, folder_class_names, load_image_folder, load_npz
from dpm.data.iterator import BatchIterator
from dpm.data.speech import (
    PhonemeVocab,
    SpeechCorpus,
    Utterance,
    align_by_templates,
    durations_from_boundaries,
    espeak_available,
    espeak_version,
    load_ljspeech,
    monotonic_alignment_search,
    phonemize,
    render,
)
from dpm.data.splits import train_test_split
from dpm.data.toy import TOY_2D_NAMES, gaussian_mixture_samples, toy_2d, toy_2d_mixture
from dpm.data.transforms import resize_images

__all__ = [
    "BatchIterator",
    "CAPTION_MAX_TOKENS",
    "CAPTION_TEMPLATES",
    "CaptionVocab",
    "DIGIT_NAMES",
    "FACE_LABELS",
    "FACE_REGION",
    "HEAD_REGION",
    "IDENTITY_TRAIT_NAMES",
    "LANDMARK_NAMES",
    "NUISANCE_NAMES",
    "augment_source",
    "face_dataset",
    "face_only",
    "load_celebamask_hq",
    "region_mask",
    "render_faces",
    "sample_identities",
    "sample_nuisance",
    "tps_warp",
    "attribute_thresholds",
    "attribute_words",
    "caption_dataset",
    "caption_digit",
    "digit_attributes",
    "digit_captions",
    "digit_forms",
    "normalize_caption",
    "IMAGE_EXTENSIONS",
    "MelConfig",
    "PhonemeVocab",
    "SKIMAGE_COLOR_IMAGES",
    "SKIMAGE_GRAY_IMAGES",
    "SpeechCorpus",
    "TOY_2D_NAMES",
    "Utterance",
    "align_by_templates",
    "durations_from_boundaries",
    "energy",
    "espeak_available",
    "espeak_version",
    "f0",
    "folder_class_names",
    "gaussian_mixture_samples",
    "griffin_lim",
    "griffin_lim_linear",
    "interpolate_f0",
    "istft",
    "linear_magnitude",
    "load_digits",
    "load_image_folder",
    "load_lfw_faces",
    "load_ljspeech",
    "load_npz",
    "log_mel",
    "mel_filterbank",
    "mel_to_linear",
    "monotonic_alignment_search",
    "num_frames",
    "phonemize",
    "random_patches",
    "read_wav",
    "render",
    "resize_images",
    "skimage_patches",
    "stft",
    "toy_2d",
    "train_test_split",
    "toy_2d_mixture",
    "write_wav",
]
