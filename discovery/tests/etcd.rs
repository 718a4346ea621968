//! The etcd backend against a real etcd (`scripts/infra ensure` runs one on 127.0.0.1:2379;
//! `KEEL_TEST_ETCD_URL` names another), each test under a prefix of its own.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use keel_discovery::{
    Backend, BackendHealth, Instance,
    etcd::{Etcd, EtcdConfig},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn backend(lease_ttl_secs: u64) -> Arc<Etcd> {
    let url = std::env::var("KEEL_TEST_ETCD_URL").unwrap_or_else(|_| "http://127.0.0.1:2379".to_owned());
    Arc::new(Etcd::new(EtcdConfig {
        endpoints: vec![url],
        prefix: format!("/keel-test/{}", uuid::Uuid::new_v4().simple()),
        lease_ttl_secs,
        ..EtcdConfig::default()
    }))
}

/// Follows `service` until the returned token is cancelled.
fn follow(backend: &Arc<Etcd>, service: &str) -> (watch::Receiver<Vec<Instance>>, CancellationToken) {
    let (sender, members) = watch::channel(Vec::new());
    let stop = CancellationToken::new();
    tokio::spawn(backend.clone().follow(service.to_owned(), sender, Arc::default(), stop.clone()));
    (members, stop)
}

async fn until(members: &mut watch::Receiver<Vec<Instance>>, what: &str, check: impl FnMut(&Vec<Instance>) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), members.wait_for(check))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

#[tokio::test]
async fn an_instance_is_listed_while_registered_with_every_change_and_gone_once_withdrawn() {
    let backend = backend(5);
    let (mut members, stop_following) = follow(&backend, "identity");
    let instance = Instance::new("identity", Some("http://10.0.0.5:50051".into()), Some("http://10.0.0.5:9101".into()));
    let (changes, registered) = watch::channel(instance.clone());
    let health = Arc::new(BackendHealth::default());
    let withdraw = CancellationToken::new();
    let registration = tokio::spawn(backend.clone().register(registered, health.clone(), withdraw.clone()));

    until(&mut members, "the instance to be listed", |list| list.as_slice() == [instance.clone()]).await;
    assert_eq!(backend.list("identity").await.unwrap(), std::slice::from_ref(&instance));
    assert!(backend.list("auth").await.unwrap().is_empty(), "another service's prefix is its own");

    // A change (the partitions it writes) is published under the same key and lease.
    changes.send_modify(|instance| {
        instance.partitions.insert("identity.users".into(), BTreeSet::from([1, 5]));
    });
    until(&mut members, "the change to be watched", |list| {
        list.len() == 1 && list[0].partitions.get("identity.users") == Some(&BTreeSet::from([1, 5]))
    })
    .await;

    // Withdrawn at once, not when the lease would expire.
    let withdrawn = Instant::now();
    withdraw.cancel();
    registration.await.unwrap();
    until(&mut members, "the instance to be gone", Vec::is_empty).await;
    assert!(withdrawn.elapsed() < Duration::from_secs(2), "revoked, not expired: {:?}", withdrawn.elapsed());
    stop_following.cancel();
}

#[tokio::test]
async fn an_instance_that_stops_keeping_its_lease_alive_is_dropped_when_the_lease_expires() {
    let backend = backend(2);
    let (mut members, stop_following) = follow(&backend, "auth");
    let instance = Instance::new("auth", Some("http://10.0.0.6:50061".into()), None);
    let (_changes, registered) = watch::channel(instance.clone());
    let registration = tokio::spawn(backend.clone().register(registered, Arc::default(), CancellationToken::new()));
    until(&mut members, "the instance to be listed", |list| list.len() == 1).await;

    // As a process killed outright: no revoke, no more keep-alives.
    registration.abort();
    let died = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(members.borrow().len(), 1, "still listed while its lease lasts");
    until(&mut members, "the lease to expire", Vec::is_empty).await;
    let after = died.elapsed();
    assert!(after < Duration::from_secs(5), "dropped within about one TTL (2 s): {after:?}");
    stop_following.cancel();
}

#[tokio::test]
async fn a_registry_that_cannot_be_reached_keeps_the_last_list_and_says_so() {
    // Nothing listens on port 9 of loopback.
    let backend = Arc::new(Etcd::new(EtcdConfig {
        endpoints: vec!["http://127.0.0.1:9".into()],
        request_timeout_ms: 300,
        ..EtcdConfig::default()
    }));
    let known = Instance::new("blog", Some("http://10.0.0.7:50081".into()), None);
    let (sender, members) = watch::channel(vec![known.clone()]);
    let health = Arc::new(BackendHealth::default());
    let stop = CancellationToken::new();
    let follower = tokio::spawn(backend.clone().follow("blog".into(), sender, health.clone(), stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while health.status().is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the failure is reported");
    let reason = health.status().unwrap_err();
    assert!(reason.starts_with("blog instances: etcd"), "{reason}");
    assert_eq!(*members.borrow(), [known], "the last known instances are kept");
    stop.cancel();
    follower.await.unwrap();
}
