import pytest
from pydantic import ValidationError

from service.protocol.demo import DemoConfig
from service.settings import Settings


def test_the_demo_config_names_an_auth_mode_the_settings_know():
    modes = Settings.model_fields["auth_mode"].annotation.__args__
    assert [DemoConfig(auth=mode, options={}).auth for mode in modes] == list(modes)
    with pytest.raises(ValidationError):
        DemoConfig(auth="password", options={})
