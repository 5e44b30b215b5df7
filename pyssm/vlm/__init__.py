"""The VLM assembly layer: a frozen pyssm encoder, a connector and a Hugging Face causal LM."""

from pyssm.vlm.cache import cache_tokens
from pyssm.vlm.connector import CONNECTORS, build_connector
from pyssm.vlm.model import VisionLanguageModel, VLMConfig
from pyssm.vlm.parse import normalize_answer, parse_box
from pyssm.vlm.preprocess import prepare_images
from pyssm.vlm.splice import splice_image_embeds
from pyssm.vlm.train import Trainer, TrainConfig

__all__ = ["cache_tokens", "CONNECTORS", "VLMConfig", "VisionLanguageModel", "build_connector",
           "normalize_answer", "parse_box", "prepare_images", "splice_image_embeds", "TrainConfig", "Trainer"]
