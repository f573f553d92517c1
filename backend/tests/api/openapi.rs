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

#[tokio::test]
async fn interactive_docs_are_served_without_a_cdn() {
    let app = crate::helpers::spawn_app(crate::helpers::Db::Sqlite).await;
    let page = app
        .client
        .get(format!("{}/api/docs/", app.address))
        .send()
        .await
        .expect("docs");
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("https://"),
        "the docs page must not load anything from the internet"
    );
    let init = app
        .client
        .get(format!("{}/api/docs/swagger-initializer.js", app.address))
        .send()
        .await
        .expect("js");
    assert!(init.text().await.expect("js").contains("/api/openapi.json"));
    let spec: serde_json::Value = app
        .client
        .get(format!("{}/api/openapi.json", app.address))
        .send()
        .await
        .expect("spec")
        .json()
        .await
        .expect("json");
    assert!(spec["paths"]["/api/v1/studies/{id}/preflight"]["get"].is_object());
}
