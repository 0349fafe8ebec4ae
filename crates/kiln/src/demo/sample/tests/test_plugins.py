import unittest

import yaml_that_is_not_installed  # noqa: F401  (fails to import: an error result)


class PluginTest(unittest.TestCase):
    def test_never_runs(self):
        pass
