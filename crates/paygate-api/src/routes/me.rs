use axum::response::Json;
use paygate_domain::{ApiKeyId, CompanyId, KeyMode, ScopeSet};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::auth::Authorized;
use crate::problem::Problem;
use crate::route;

/// The calling key and its company.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    #[schema(example = "me")]
    pub object: &'static str,
    pub key: MeKey,
    pub company: MeCompany,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeKey {
    pub id: ApiKeyId,
    pub name: String,
    pub owner: String,
    pub mode: KeyMode,
    pub scopes: ScopeSet,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeCompany {
    pub id: CompanyId,
    pub name: String,
}

route! {
    GetMeRoute { scope: AnyValidKey, audit: IdentityRead, limit: Read }
}

/// Who am I? Any valid key may ask.
#[utoipa::path(
    get,
    path = "/me",
    tag = "identity",
    responses(
        (status = 200, description = "The calling key and its company", body = Me),
        (status = 401, description = "Missing, invalid, revoked or expired key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Company suspended", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_me(auth: Authorized<GetMeRoute>) -> Json<Me> {
    let record = &auth.caller.record;
    let key = &record.key;
    Json(Me {
        object: "me",
        key: MeKey {
            id: key.id,
            name: key.name.clone(),
            owner: key.owner.clone(),
            mode: key.mode,
            scopes: key.scopes,
            expires_at: key.expires_at,
        },
        company: MeCompany { id: key.company_id, name: record.company_name.clone() },
    })
}
