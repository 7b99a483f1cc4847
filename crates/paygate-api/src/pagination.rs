//! `?limit=1..100` (default 25) and `?cursor=`; lists are newest first and the
//! cursor is the id of the last item of the previous page, so items created
//! while a client pages never shift or repeat later pages.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::problem::{ApiError, FieldError};

pub const DEFAULT_LIMIT: u32 = 25;
pub const MAX_LIMIT: u32 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// 1..=100, default 25.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl ListParams {
    /// Validates the parameters; `parse_cursor` turns the cursor into an id.
    pub fn parse<Id>(
        &self,
        parse_cursor: impl Fn(&str) -> Option<Id>,
    ) -> Result<paygate_store::PageRequest<Id>, ApiError> {
        let mut errors = Vec::new();
        let page = page_request(&mut errors, self.limit.as_deref(), self.cursor.as_deref(), parse_cursor);
        if errors.is_empty() { Ok(page) } else { Err(ApiError::invalid_parameter(errors)) }
    }
}

/// `limit` and `cursor` of any list, with their problems added to `errors`.
pub fn page_request<Id>(
    errors: &mut Vec<FieldError>,
    limit: Option<&str>,
    cursor: Option<&str>,
    parse_cursor: impl Fn(&str) -> Option<Id>,
) -> paygate_store::PageRequest<Id> {
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(text) => text.parse::<u32>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).unwrap_or_else(|| {
            errors.push(FieldError::parameter("limit", format!("must be an integer from 1 to {MAX_LIMIT}")));
            DEFAULT_LIMIT
        }),
    };
    let after = cursor.and_then(|text| {
        let parsed = parse_cursor(text);
        if parsed.is_none() {
            errors.push(FieldError::parameter("cursor", "is not a cursor returned by this list"));
        }
        parsed
    });
    paygate_store::PageRequest { limit, after }
}

/// `{"object":"list","data":[…],"has_more":bool,"next_cursor":…}`
#[derive(Debug, Serialize, ToSchema)]
pub struct List<T: ToSchema> {
    #[schema(example = "list")]
    pub object: &'static str,
    pub data: Vec<T>,
    pub has_more: bool,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

impl<T: ToSchema> List<T> {
    pub fn new(data: Vec<T>, has_more: bool, last_id: Option<String>) -> Self {
        Self { object: "list", data, has_more, next_cursor: if has_more { last_id } else { None } }
    }
}
