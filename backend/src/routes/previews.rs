use actix_web::{HttpResponse, get, post, web};
use consilium_core::api::{DecidePreview, PreviewDto, RequestPreview};
use consilium_core::problem::Problem;
use utoipa_actix_web::service_config::ServiceConfig;
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::context::AppContext;
use crate::error::AppResult;
use crate::services::previews;

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(request)
        .service(list)
        .service(get_preview)
        .service(image)
        .service(mask)
        .service(overlay)
        .service(decide);
}

/// Asks a site for a synthetic preview of its data (the study's researcher, under a grant in
/// force for the site). The site's worker generates it and checks it for memorisation.
#[utoipa::path(tag = "previews", responses((status = 201, body = PreviewDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/studies/{id}/previews")]
async fn request(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<RequestPreview>,
) -> AppResult<HttpResponse> {
    Ok(HttpResponse::Created()
        .json(previews::request(&ctx, &a, id.into_inner(), body.into_inner()).await?))
}

/// The study's previews you may see: a site's custodian sees its site's sets with their
/// images; the researcher sees the images once released.
#[utoipa::path(tag = "previews", responses((status = 200, body = Vec<PreviewDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/studies/{id}/previews")]
async fn list(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<Vec<PreviewDto>>> {
    Ok(web::Json(previews::list(&ctx, &a, id.into_inner()).await?))
}

/// One preview set.
#[utoipa::path(tag = "previews", responses((status = 200, body = PreviewDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/previews/{id}")]
async fn get_preview(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
) -> AppResult<web::Json<PreviewDto>> {
    Ok(web::Json(previews::get(&ctx, &a, id.into_inner()).await?))
}

/// One synthetic image of a set (PNG).
#[utoipa::path(tag = "previews", responses(
    (status = 200, description = "PNG", body = Vec<u8>, content_type = "image/png"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/previews/{id}/images/{index}")]
async fn image(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, u32)>,
) -> AppResult<HttpResponse> {
    let (id, index) = path.into_inner();
    Ok(png(previews::image(&ctx, &a, id, index).await?))
}

fn png(bytes: Vec<u8>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("image/png")
        .insert_header(("Cache-Control", "private, no-store"))
        .body(bytes)
}

/// The synthetic mask generated with one image of a preview of segmentation data: a grey PNG
/// whose pixel values are the plan's mask values (`model.labels`; 16-bit when a value is above
/// 255). 404 for a classifier's preview.
#[utoipa::path(tag = "previews", responses(
    (status = 200, description = "PNG", body = Vec<u8>, content_type = "image/png"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/previews/{id}/images/{index}/mask")]
async fn mask(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, u32)>,
) -> AppResult<HttpResponse> {
    let (id, index) = path.into_inner();
    Ok(png(previews::mask(
        &ctx,
        &a,
        id,
        index,
        previews::MaskView::Mask,
    )
    .await?))
}

/// One image of a preview of segmentation data with its synthetic mask drawn over it: each
/// foreground class in its colour (the preview's `classes`), the background left grey (RGB
/// PNG). 404 for a classifier's preview.
#[utoipa::path(tag = "previews", responses(
    (status = 200, description = "PNG", body = Vec<u8>, content_type = "image/png"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/previews/{id}/images/{index}/overlay")]
async fn overlay(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    path: web::Path<(Uuid, u32)>,
) -> AppResult<HttpResponse> {
    let (id, index) = path.into_inner();
    Ok(png(previews::mask(
        &ctx,
        &a,
        id,
        index,
        previews::MaskView::Overlay,
    )
    .await?))
}

/// Releases a checked preview set to the study's researcher, or rejects it (the site's
/// custodian), with a comment.
#[utoipa::path(tag = "previews", responses((status = 200, body = PreviewDto),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[post("/previews/{id}/decision")]
async fn decide(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    id: web::Path<Uuid>,
    body: web::Json<DecidePreview>,
) -> AppResult<web::Json<PreviewDto>> {
    Ok(web::Json(
        previews::decide(&ctx, &a, id.into_inner(), body.into_inner()).await?,
    ))
}
