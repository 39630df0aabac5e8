"""The SDK's configuration classes, as the SDK documents them (defined in `xconnector.config`)."""

from xconnector.config.schema import *  # noqa: F403
from xconnector.config.schema import __all__ as __all__
