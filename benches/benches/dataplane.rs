//! lb-examples dataplane (issue 8): groups registered here.

use criterion::Criterion;

pub fn register(_c: &mut Criterion) {}
