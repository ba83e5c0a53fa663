"""Settings: how ``key=value`` overrides combine with a config file."""

from __future__ import annotations

import pytest
import yaml

from moela.settings import load_settings


def test_an_override_below_a_setting_changes_only_that_key(tmp_path):
    """``adapter.options.uniform.rank=8`` keeps the other options, ``data.train.limit=…`` the source's path; a
    whole mapping given as the value still replaces the setting."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train": {"path": "t.json", "limit": 9}},
                                      "adapter": {"options": {"uniform": {"experts": 4, "rank": 4}}}}))
    settings = load_settings(config, ["adapter.options.uniform.rank=8", "adapter.options.hilo.experts=2222",
                                      "data.train.limit=64"])
    assert settings.adapter.options == {"uniform": {"experts": 4, "rank": 8}, "hilo": {"experts": 2222}}
    assert settings.data.train == {"path": "t.json", "limit": 64}
    assert load_settings(config, ["data.train={path: u.json}"]).data.train == {"path": "u.json"}
    assert load_settings(config, ["data.eval=dev.tsv", "data.eval.limit=50"]).data.eval == {"path": "dev.tsv",
                                                                                            "limit": 50}
    with pytest.raises(ValueError, match="config key 'data.eval' is a list: give the whole list"):
        load_settings(config, ["data.eval=[a.json, b.json]", "data.eval.limit=50"])
    assert yaml.safe_dump(settings.to_dict())  # plain mappings, as the run folder's config.yaml stores them
