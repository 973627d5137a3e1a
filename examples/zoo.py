from fxcompress.zoo import *  # noqa: F401,F403  the model zoo moved into the package (fxcompress.zoo)
