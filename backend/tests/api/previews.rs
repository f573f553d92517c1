//! Synthetic previews through the API: who may ask, who may see, who may release, and the
//! errors on the way (the browser test in tests/portal walks the generated path).

use crate::engine::{answer_preview, approved_study_at, engine_manifest, segmentation_plan};
use crate::helpers::*;
use crate::on_both;
use base64::Engine as _;
use consilium_core::preview::{MemorisationReport, PreviewImageData, PreviewSet};
use serde_json::{Value, json};
use std::time::Duration;

async fn previews_are_governed(db: Db) {
    let app = spawn_app(db).await;
    let w = world(&app).await;
    let (sid, _) =
        approved_study_at(&app, &w, engine_manifest(2), &[(w.site_a, &w.custodian_a)]).await;
    let r = &w.researcher.auth;
    let path = format!("/api/v1/studies/{sid}/previews");

    let bad = app
        .post(&path, r, json!({"site_id": w.site_a, "per_class": 0}))
        .await
        .expect(422);
    assert!(
        bad["detail"].as_str().unwrap().contains("per_class"),
        "{bad}"
    );
    let bad = app
        .post(&path, r, json!({"site_id": w.site_b}))
        .await
        .expect(422);
    assert!(
        bad["detail"]
            .as_str()
            .unwrap()
            .contains("does not take part"),
        "{bad}"
    );
    app.post(
        &path,
        &w.other_researcher.auth,
        json!({"site_id": w.site_a}),
    )
    .await
    .expect(404);

    let p = app
        .post(&path, r, json!({"site_id": w.site_a, "per_class": 4}))
        .await
        .expect(201);
    assert_eq!(p["status"], "generating");
    assert_eq!(p["images"], json!([]));
    let pid = p["id"].as_str().unwrap().to_string();

    // The other site's custodian does not see it; this site's custodian does.
    app.get(&format!("/api/v1/previews/{pid}"), &w.custodian_b.auth)
        .await
        .expect(404);
    app.get(&format!("/api/v1/previews/{pid}"), &w.custodian_a.auth)
        .await
        .expect(200);
    let listed = app.get(&path, &w.custodian_b.auth).await.expect(404);
    assert_eq!(listed["code"], "not_found");

    // Nothing to release before the site has answered; only the custodian decides.
    let early = app
        .post(
            &format!("/api/v1/previews/{pid}/decision"),
            &w.custodian_a.auth,
            json!({"decision": "release", "comment": "ok"}),
        )
        .await
        .expect(409);
    assert!(
        early["detail"].as_str().unwrap().contains("generating"),
        "{early}"
    );
    app.post(
        &format!("/api/v1/previews/{pid}/decision"),
        r,
        json!({"decision": "release", "comment": "mine"}),
    )
    .await
    .expect(403);
    let bad = app
        .post(
            &format!("/api/v1/previews/{pid}/decision"),
            &w.custodian_a.auth,
            json!({"decision": "publish", "comment": ""}),
        )
        .await
        .expect(422);
    assert_eq!(bad["errors"].as_array().unwrap().len(), 2, "{bad}");
    // The researcher may not see images before release.
    app.get(&format!("/api/v1/previews/{pid}/images/0"), r)
        .await
        .expect(403);

    // Without a grant in force, no preview.
    let requests = app
        .get(&format!("/api/v1/access-requests?study_id={sid}"), r)
        .await
        .expect(200);
    let req = requests[0]["id"].as_str().unwrap().to_string();
    app.post(
        &format!("/api/v1/access-requests/{req}/revoke"),
        &w.custodian_a.auth,
        json!({"reason": "audit"}),
    )
    .await
    .expect(200);
    let refused = app
        .post(&path, r, json!({"site_id": w.site_a}))
        .await
        .expect(409);
    assert_eq!(refused["code"], "no_grant");

    let events = app
        .get(
            "/api/v1/audit/events?action=preview.requested",
            &w.auditor.auth,
        )
        .await
        .expect(200);
    assert_eq!(events.as_array().unwrap().len(), 1);
}
on_both!(previews_are_governed);

fn png_b64(img: image::DynamicImage) -> String {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

/// A 32×32 grey image (value 100) and a mask of `size`×`size` whose left half is `class`.
fn pair(size: u32, class: u8) -> PreviewImageData {
    let mask = image::GrayImage::from_fn(size, size, |x, _| {
        image::Luma([if x < size / 2 { class } else { 0 }])
    });
    PreviewImageData {
        label: 0,
        png_base64: png_b64(image::GrayImage::from_pixel(32, 32, image::Luma([100])).into()),
        mask_png_base64: Some(png_b64(mask.into())),
    }
}

fn set_of(images: Vec<PreviewImageData>) -> PreviewSet {
    PreviewSet {
        generator: "pca_gaussian".into(),
        epsilon: None,
        image_size: 32,
        memorisation: MemorisationReport {
            real_nn_median: 1.0,
            ratios: vec![1.0; images.len()],
            flagged: Vec::new(),
            threshold: 0.5,
        },
        images,
        summary: Default::default(),
    }
}

/// Asks North for a preview of `study`, then answers it as North's worker would (its worker
/// token, its registered key, its broker: `answer_preview`) with `set`; returns the preview
/// once recorded.
async fn answered_with(app: &TestApp, w: &World, study: &str, set: &PreviewSet) -> Value {
    let preview = id_of(
        &app.post(
            &format!("/api/v1/studies/{study}/previews"),
            &w.researcher.auth,
            json!({"site_id": w.site_a, "per_class": 1}),
        )
        .await
        .expect(201),
    );
    answer_preview(
        app,
        w.site_a,
        &w.custodian_a,
        &preview,
        serde_json::to_vec(set).expect("json"),
        set.images.len() as u32,
    )
    .await;
    for _ in 0..100 {
        let p = app
            .get(&format!("/api/v1/previews/{preview}"), &w.custodian_a.auth)
            .await
            .expect(200);
        if p["status"] != "generating" {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("preview {preview} was never recorded");
}

/// A site's preview set is shown only when its masks are what the study's plan asks. Sent by
/// the site's own worker (its token, key and broker), a set whose mask names a class the plan
/// does not, an image without a mask, a mask far larger than its image (a decompression bomb
/// for whoever draws it), or a classifier's set carrying masks is failed with the reason, and
/// none of its images is served; a set that fits shows its classes, and each image's mask
/// and the mask drawn over it.
#[tokio::test]
async fn a_preview_set_whose_masks_do_not_fit_the_plan_is_not_shown() {
    let app = spawn_app(Db::Sqlite).await;
    let w = world(&app).await;
    let north = [(w.site_a, &w.custodian_a)];
    let (segmenting, _) = approved_study_at(&app, &w, segmentation_plan(2), &north).await;
    let (classifying, _) = approved_study_at(&app, &w, engine_manifest(2), &north).await;

    let unmasked = PreviewImageData {
        mask_png_base64: None,
        ..pair(32, 1)
    };
    for (study, set, problem) in [
        (
            &segmenting,
            set_of(vec![pair(32, 1), pair(32, 5)]),
            "image 1's mask has class 5, and the plan names 2 classes",
        ),
        (
            &segmenting,
            set_of(vec![unmasked]),
            "image 0 has no mask, and the plan segments images",
        ),
        (
            &segmenting,
            set_of(vec![pair(4096, 1)]),
            "image 0's mask: not a PNG of 32×32",
        ),
        (
            &classifying,
            set_of(vec![pair(32, 1)]),
            "image 0 carries a mask, and the plan trains a classifier",
        ),
    ] {
        let p = answered_with(&app, &w, study, &set).await;
        assert_eq!(p["status"], "failed", "{p}");
        let failure = p["failure"].as_str().unwrap_or_default();
        assert!(
            failure.contains("does not fit the study's plan") && failure.contains(problem),
            "{failure}"
        );
        let id = p["id"].as_str().expect("id");
        let refused = app
            .get(
                &format!("/api/v1/previews/{id}/images/0"),
                &w.custodian_a.auth,
            )
            .await
            .expect(409);
        assert_eq!(refused["code"], "invalid_state", "{refused}");
    }

    // A set that fits: its classes with their colours, and each image's mask and overlay.
    let p = answered_with(&app, &w, &segmenting, &set_of(vec![pair(32, 1)])).await;
    assert_eq!(p["status"], "awaiting_release", "{p}");
    assert_eq!(
        p["classes"],
        json!([
            {"value": 0, "name": "background", "colour": null},
            {"value": 1, "name": "lesion", "colour": "#e69f00"}
        ])
    );
    let id = p["id"].as_str().expect("id");
    let png = |path: String| {
        let app = &app;
        let bearer = token(&w.custodian_a);
        async move {
            let r = app
                .client
                .get(format!("{}{path}", app.address))
                .bearer_auth(bearer)
                .send()
                .await
                .expect("sent");
            assert_eq!(r.status(), 200, "{path}");
            assert_eq!(r.headers()["content-type"], "image/png");
            image::load_from_memory(&r.bytes().await.expect("body")).expect("a PNG")
        }
    };
    let mask = png(format!("/api/v1/previews/{id}/images/0/mask"))
        .await
        .to_luma8();
    assert_eq!(
        mask.get_pixel(0, 0).0,
        [1],
        "the plan's mask value of a lesion"
    );
    assert_eq!(mask.get_pixel(31, 0).0, [0]);
    let overlay = png(format!("/api/v1/previews/{id}/images/0/overlay"))
        .await
        .to_rgb8();
    assert_eq!(overlay.dimensions(), (32, 32));
    // The lesion (left half) in its colour over grey 100; the background stays grey.
    assert_eq!(
        overlay.get_pixel(0, 0).0,
        consilium_core::preview::overlay(&[100], &[1])[..]
    );
    assert_eq!(overlay.get_pixel(31, 0).0, [100, 100, 100]);
    let missing = app
        .get(
            &format!("/api/v1/previews/{id}/images/7/overlay"),
            &w.custodian_a.auth,
        )
        .await
        .expect(404);
    assert!(
        missing["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("there is no image 7"),
        "{missing}"
    );
    // The researcher sees neither before the custodian releases the set.
    app.get(
        &format!("/api/v1/previews/{id}/images/0/overlay"),
        &w.researcher.auth,
    )
    .await
    .expect(403);

    // A classifier's preview has no masks to show.
    let p = answered_with(
        &app,
        &w,
        &classifying,
        &set_of(vec![PreviewImageData {
            mask_png_base64: None,
            ..pair(32, 0)
        }]),
    )
    .await;
    assert_eq!(p["status"], "awaiting_release", "{p}");
    assert_eq!(p["classes"], json!([]));
    let none = app
        .get(
            &format!(
                "/api/v1/previews/{}/images/0/mask",
                p["id"].as_str().expect("id")
            ),
            &w.custodian_a.auth,
        )
        .await
        .expect(404);
    assert!(
        none["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("trains a classifier"),
        "{none}"
    );
}
