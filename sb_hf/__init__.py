"""sb-hf: support-basis attention (arXiv 2510.01643) as a Hugging Face Transformers backend.

``import sb_hf`` registers ``attn_implementation="support_basis"`` and ``"as23"`` (with their mask
function) so that ``from_pretrained(..., attn_implementation="support_basis")`` works.
"""

from . import ops
from .config import SupportBasisConfig
from .integrations.hf import apply_support_basis, register

__version__ = "0.1.0"

register()

__all__ = ["SupportBasisConfig", "apply_support_basis", "ops", "register", "__version__"]
