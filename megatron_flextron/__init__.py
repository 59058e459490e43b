"""megatron_flextron: Flextron elastic LLMs on NVIDIA Megatron-Core."""

import warnings

# megatron-core warns at import time that the optional GPU accelerators are absent; this project
# never needs them (see README), so the warnings carry no information here.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")

__version__ = "0.1.0"
