-- Gateways keep found API keys in memory for gateway.key_cache_ttl_ms. A revocation (or a
-- deleted key row) is announced on the channel weir_api_key_revoked with the key id, at
-- commit, whoever makes it (`weir keys revoke` or plain SQL), so that listening gateways
-- forget the key at once; the TTL stays the bound when a notification is lost.
CREATE FUNCTION weir_api_key_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('weir_api_key_revoked', OLD.key_id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER weir_api_key_revoked_update
    AFTER UPDATE OF revoked_at ON weir_api_keys
    FOR EACH ROW WHEN (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL)
    EXECUTE FUNCTION weir_api_key_revoked();

CREATE TRIGGER weir_api_key_revoked_delete
    AFTER DELETE ON weir_api_keys
    FOR EACH ROW EXECUTE FUNCTION weir_api_key_revoked();
