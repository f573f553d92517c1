use actix_web::{HttpResponse, get, web};
use consilium_core::Role;
use consilium_core::api::{
    AuditEventDto, AuditQuery, AuditVerification, ExportFormat, ExportQuery,
};
use consilium_core::problem::Problem;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::audit;
use crate::auth::Authenticated;
use crate::context::AppContext;
use crate::domain::Actor;
use crate::error::{AppError, AppResult};
use crate::services::require_any;

pub fn configure(cfg: &mut ServiceConfig) {
    cfg.service(events).service(verify).service(export);
}

fn may_read(a: &Actor) -> AppResult<()> {
    require_any(
        a,
        &[Role::Administrator, Role::Auditor],
        "read the audit trail",
    )
}

/// Audit events in log order, filtered.
#[utoipa::path(tag = "audit", params(AuditQuery), responses((status = 200, body = Vec<AuditEventDto>),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/audit/events")]
async fn events(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    q: web::Query<AuditQuery>,
) -> AppResult<web::Json<Vec<AuditEventDto>>> {
    may_read(&a)?;
    Ok(web::Json(audit::list(&ctx.db, &q).await?))
}

/// Recomputes the hash chain and names the first broken event.
#[utoipa::path(tag = "audit", responses((status = 200, body = AuditVerification),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/audit/verify")]
async fn verify(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
) -> AppResult<web::Json<AuditVerification>> {
    may_read(&a)?;
    Ok(web::Json(audit::verify(&ctx.db).await?))
}

/// The log as JSON lines (default) or CSV — every event, or those the filters select; or, with `format=signatures`, every signed
/// site update with its site's public key, for `consilium verify-lineage` to check offline.
#[utoipa::path(tag = "audit", params(ExportQuery), responses(
    (status = 200, description = "The log: JSON lines, or CSV with format=csv", body = String, content_type = "application/x-ndjson"),
    (status = "4XX", body = Problem, content_type = "application/problem+json")))]
#[get("/audit/export")]
async fn export(
    ctx: web::Data<AppContext>,
    Authenticated(a): Authenticated,
    q: web::Query<ExportQuery>,
) -> AppResult<HttpResponse> {
    may_read(&a)?;
    let format = q.format.unwrap_or_default();
    let filter = q.filter();
    if format == ExportFormat::Signatures && filter != AuditQuery::default() {
        return Err(AppError::Invalid(
            "format=signatures lists every signed update; it takes no event filters (drop actor, action, object_type, object_id, from and to).".into(),
        ));
    }
    let mut out: Vec<u8> = Vec::new();
    match format {
        ExportFormat::Jsonl => {
            audit::for_each_matching(&ctx.db, &filter, |e| {
                serde_json::to_writer(&mut out, &audit::to_dto(e))?;
                out.push(b'\n');
                Ok(())
            })
            .await?;
        }
        ExportFormat::Csv => {
            let mut w = csv::Writer::from_writer(&mut out);
            audit::for_each_matching(&ctx.db, &filter, |e| {
                w.serialize(audit::to_dto(e)).map_err(AppError::unexpected)
            })
            .await?;
            w.flush().map_err(AppError::unexpected)?;
        }
        ExportFormat::Signatures => {
            for s in crate::services::models::all_signed_updates(&ctx).await? {
                serde_json::to_writer(&mut out, &s)?;
                out.push(b'\n');
            }
        }
    }
    let (ctype, ext) = match format {
        ExportFormat::Jsonl => ("application/x-ndjson", "jsonl"),
        ExportFormat::Csv => ("text/csv; charset=utf-8", "csv"),
        ExportFormat::Signatures => ("application/x-ndjson", "signatures.jsonl"),
    };
    Ok(HttpResponse::Ok()
        .content_type(ctype)
        .insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"consilium-audit.{ext}\""),
        ))
        .body(out))
}
