"""asga-deploy: mixed-precision quantization search (ASGA), QAT fine-tuning and exact INT8 export."""

__version__ = "0.1.0"
