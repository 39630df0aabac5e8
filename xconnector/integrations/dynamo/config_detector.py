"""Config discovery as Dynamo workers use it: the public names of `xconnector.config.discovery`."""

from xconnector.config.discovery import *  # noqa: F403
