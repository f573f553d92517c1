//! The committed OpenAPI document matches the code.

#[test]
fn committed_openapi_document_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = consilium_backend::startup::openapi_json().expect("the document serialises");
    assert!(
        committed == generated,
        "openapi/openapi.json is stale. Regenerate it with:\n\n    cargo run -p consilium-backend -- openapi\n"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).expect("json");
    let operations: usize = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|p| p.as_object().map_or(0, |o| o.len()))
        .sum();
    assert!(
        operations >= 40,
        "every operation is documented ({operations})"
    );
}
