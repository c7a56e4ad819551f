//! Tests of the reverse: the shipped transforms against their reverse fixtures, the laws on
//! reference documents, the classification, and the semantics the fixtures cannot show.

use std::path::PathBuf;

use super::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped_topics() -> Topics {
    crate::topics::load(&repo().join("topics")).unwrap_or_else(|r| panic!("{r}"))
}

fn shipped() -> Vec<ServiceTransforms> {
    load_all(&repo().join("transforms"), &shipped_topics()).unwrap_or_else(|r| panic!("{r}"))
}

#[test]
fn scratch_laws_on_reference_documents() {
    let topics = shipped_topics();
    let mut w = crate::workload::Workload::new(11);
    let mut docs = Vec::new();
    for c in crate::workload::Workload::COLLECTIONS {
        for i in 0..6 {
            docs.push((c.to_string(), w.document(c, i, 4).unwrap()));
        }
    }
    let mut bad = String::new();
    for svc in shipped() {
        let report = check_laws(&svc, &topics, "linechatbot", docs.clone());
        println!("{}", report.render(5));
        if !report.ok() {
            bad.push_str(&report.render(5));
        }
    }
    assert!(bad.is_empty(), "{bad}");
}
