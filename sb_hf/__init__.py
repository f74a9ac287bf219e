"""sb-hf: support-basis attention (arXiv 2510.01643) as a Hugging Face Transformers backend.

``import sb_hf`` registers ``attn_implementation="support_basis"``, ``"as23"`` and ``"sink_window"``
(with their mask function) so that ``from_pretrained(..., attn_implementation="support_basis")`` works.
``sb_hf.apply_support_basis()`` (no model) switches every model a script loads afterwards.
"""

from . import ops
from .config import SupportBasisConfig
from .integrations.hf import register
from .patches import apply_support_basis, revert_support_basis

__version__ = "0.1.0"

register()

__all__ = ["SupportBasisConfig", "apply_support_basis", "ops", "register", "revert_support_basis", "__version__"]
