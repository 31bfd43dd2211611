"""The tenant-pair settings (API keys, webhook secrets) share one parser: malformed items are refused at start-up,
values are stripped, and each setting maps tenants the same way."""
import base64

import pytest
from pydantic import ValidationError

from core.settings import Settings, tenant_pairs


def test_tenant_pairs_strips_and_keeps_order():
    assert tenant_pairs(" a : k1 ,b:k2,, a:k3 ") == [("a", "k1"), ("b", "k2"), ("a", "k3")]
    assert tenant_pairs("") == []


@pytest.mark.parametrize("bad", ["a", ":k", "a:", " : ", "a:k,b"])
def test_tenant_pairs_refuses_items_without_tenant_colon_or_value(bad):
    with pytest.raises(ValueError, match="tenant:key pairs"):
        tenant_pairs(bad, "key")


def test_settings_use_the_parser_for_keys_and_webhook_secrets():
    secret = "whsec_" + base64.b64encode(b"x" * 24).decode()
    s = Settings(api_keys="lab1: key-one ,lab2:key-two", webhook_secrets=f"lab1:{secret}, lab1 : {secret}")
    assert s.tenants_by_key == {"key-one": "lab1", "key-two": "lab2"}
    assert s.webhook_secret_map == {"lab1": [b"x" * 24, b"x" * 24]}
    with pytest.raises(ValidationError, match="tenant:key pairs"):
        Settings(api_keys="lab1")
    with pytest.raises(ValidationError, match="whsec_"):
        Settings(webhook_secrets="lab1:")
    with pytest.raises(ValidationError):
        Settings(webhook_secrets="lab1:not-a-secret")
