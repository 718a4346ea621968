//! The topic catalogue: every topic Keel writes, its partitions, configs and value schema.

use std::fmt;

/// A topic Keel owns. One topic per aggregate type, keyed by aggregate id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    IdentityUsers,
    AuthCredentials,
    AuthSessions,
    AuthzRoles,
    AuthzUserRoles,
    BlogPosts,
    BlogComments,
}

/// How a topic is created.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec {
    pub topic: Topic,
    /// Name without the installation's prefix.
    pub base_name: &'static str,
    /// Fixed at creation: keys are hashed over it, and some brokers cannot add partitions.
    pub partitions: i32,
    pub configs: &'static [(&'static str, &'static str)],
    /// The Avro schema of record values, as kept in `topics/schemas/`.
    pub value_schema: &'static str,
    /// Whether the fields its schema marks `keel.sensitive` are sealed with the key of the
    /// aggregate (a user), so that erasing the key erases them from the log
    /// ([`crate::sealing`]). Sensitive fields of other topics are only redacted when shown.
    pub sealed: bool,
}

/// The log is the source of truth: events are kept forever.
const EVENT_LOG_CONFIGS: &[(&str, &str)] = &[("cleanup.policy", "delete"), ("retention.ms", "-1")];

/// One topic per aggregate type. Partition counts are fixed at creation.
const CATALOGUE: &[TopicSpec] = &[
    event_log(Topic::IdentityUsers, "identity.users", include_str!("../schemas/identity.users-value.avsc"), true),
    event_log(Topic::AuthCredentials, "auth.credentials", include_str!("../schemas/auth.credentials-value.avsc"), true),
    event_log(Topic::AuthSessions, "auth.sessions", include_str!("../schemas/auth.sessions-value.avsc"), false),
    event_log(Topic::AuthzRoles, "authz.roles", include_str!("../schemas/authz.roles-value.avsc"), false),
    event_log(Topic::AuthzUserRoles, "authz.user-roles", include_str!("../schemas/authz.user-roles-value.avsc"), false),
    event_log(Topic::BlogPosts, "blog.posts", include_str!("../schemas/blog.posts-value.avsc"), false),
    event_log(Topic::BlogComments, "blog.comments", include_str!("../schemas/blog.comments-value.avsc"), false),
];

const fn event_log(topic: Topic, base_name: &'static str, value_schema: &'static str, sealed: bool) -> TopicSpec {
    TopicSpec { topic, base_name, partitions: 8, configs: EVENT_LOG_CONFIGS, value_schema, sealed }
}

/// A topic Keel writes that is not an aggregate's event log.
#[derive(Debug, Clone, Copy)]
pub struct AuxiliaryTopic {
    pub base_name: &'static str,
    pub partitions: i32,
    pub configs: &'static [(&'static str, &'static str)],
}

/// Records projections could not apply, with the error and the original position in headers.
pub const DEAD_LETTERS: AuxiliaryTopic =
    AuxiliaryTopic { base_name: "keel.dead-letters", partitions: 1, configs: EVENT_LOG_CONFIGS };

impl Topic {
    pub const ALL: &'static [Topic] = &[
        Topic::IdentityUsers,
        Topic::AuthCredentials,
        Topic::AuthSessions,
        Topic::AuthzRoles,
        Topic::AuthzUserRoles,
        Topic::BlogPosts,
        Topic::BlogComments,
    ];

    pub fn spec(self) -> &'static TopicSpec {
        CATALOGUE.iter().find(|spec| spec.topic == self).expect("every topic is in the catalogue")
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spec().base_name)
    }
}

/// Full topic names of one installation (`<prefix><base name>`).
#[derive(Debug, Clone, Default)]
pub struct TopicNames {
    prefix: String,
}

impl TopicNames {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn name(&self, topic: Topic) -> String {
        format!("{}{}", self.prefix, topic.spec().base_name)
    }

    /// The topic a full name refers to, if it is one of ours.
    pub fn parse(&self, name: &str) -> Option<Topic> {
        let base = name.strip_prefix(&self.prefix)?;
        Topic::ALL.iter().copied().find(|topic| topic.spec().base_name == base)
    }

    /// The full name of an auxiliary topic.
    pub fn auxiliary(&self, topic: &AuxiliaryTopic) -> String {
        format!("{}{}", self.prefix, topic.base_name)
    }

    /// The Confluent subject of record values (TopicNameStrategy).
    pub fn value_subject(&self, topic: Topic) -> String {
        format!("{}-value", self.name(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_in_the_catalogue_parses() {
        for topic in Topic::ALL {
            apache_avro::Schema::parse_str(topic.spec().value_schema).unwrap();
        }
    }

    #[test]
    fn every_topic_is_in_the_catalogue_once() {
        for topic in Topic::ALL {
            assert_eq!(CATALOGUE.iter().filter(|spec| spec.topic == *topic).count(), 1, "{topic:?}");
        }
        assert_eq!(CATALOGUE.len(), Topic::ALL.len());
    }

    #[test]
    fn names_round_trip_with_a_prefix() {
        let names = TopicNames::new("staging.");
        assert_eq!(names.name(Topic::IdentityUsers), "staging.identity.users");
        assert_eq!(names.parse("staging.identity.users"), Some(Topic::IdentityUsers));
        assert_eq!(names.parse("identity.users"), None);
        assert_eq!(names.value_subject(Topic::IdentityUsers), "staging.identity.users-value");
    }
}
