"""XConnector's exceptions, as the SDK documents them (defined in `xconnector.exceptions`)."""

from xconnector.exceptions import CacheError as CacheError
from xconnector.exceptions import ConfigError as ConfigError
from xconnector.exceptions import InternalError as InternalError
from xconnector.exceptions import InvalidInputError as InvalidInputError
from xconnector.exceptions import NativeModuleError as NativeModuleError
from xconnector.exceptions import StateError as StateError
from xconnector.exceptions import XConnectorError as XConnectorError
