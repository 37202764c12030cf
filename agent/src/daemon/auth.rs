//! Who is asking: the bearer token of a request, matched against each role's token
//! in constant time, and what each role may do.

use super::config::Tokens;
use crate::migration::protocol::same_secret as same;

/// A caller, by the token it presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads and changes everything.
    Operator,
    /// Another host's agent: reads, and asks this host to receive a VM.
    Peer,
    /// Alertmanager: posts alerts, nothing else.
    Webhook,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Peer => "peer",
            Role::Webhook => "webhook",
        }
    }
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Reading the host's VMs and migrations: an operator or a peer.
    Read,
    /// Changing anything: an operator.
    Operate,
    /// Asking this host to receive a VM: a peer (or an operator, by hand).
    Receive,
    /// Posting alerts: Alertmanager (or an operator, by hand).
    Alert,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one of no role: 401.
    Unauthenticated(&'static str),
    /// A token of a role this endpoint does not serve: 403.
    Forbidden(Role),
}

/// The role of `header` (an `Authorization` header's value, if any).
pub fn role_of(tokens: &Tokens, header: Option<&str>) -> Result<Role, Denied> {
    let Some(header) = header else {
        return Err(Denied::Unauthenticated(
            "no Authorization header: send `Authorization: Bearer <token>`",
        ));
    };
    let Some(token) = header.strip_prefix("Bearer ") else {
        return Err(Denied::Unauthenticated(
            "the Authorization header is not `Bearer <token>`",
        ));
    };
    let token = token.trim().as_bytes();
    // Every role's token is compared, whichever matches, so the time says nothing
    // of which one did.
    let mut role = None;
    for (r, t) in [
        (Role::Operator, Some(&tokens.operator)),
        (Role::Peer, tokens.peer.as_ref()),
        (Role::Webhook, tokens.webhook.as_ref()),
    ] {
        if let Some(t) = t
            && same(token, t.as_bytes())
        {
            role = Some(r);
        }
    }
    role.ok_or(Denied::Unauthenticated(
        "the token is not one of this agent's",
    ))
}

/// Whether `role` may do what `need` says.
pub fn allows(role: Role, need: Need) -> bool {
    matches!(
        (role, need),
        (Role::Operator, _)
            | (Role::Peer, Need::Read | Need::Receive)
            | (Role::Webhook, Need::Alert)
    )
}

pub fn check(tokens: &Tokens, header: Option<&str>, need: Need) -> Result<Role, Denied> {
    let role = role_of(tokens, header)?;
    if allows(role, need) {
        Ok(role)
    } else {
        Err(Denied::Forbidden(role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            operator: "operator-token-0123".into(),
            peer: Some("peer-token-0123456".into()),
            webhook: Some("webhook-token-0123".into()),
        }
    }

    #[test]
    fn each_token_is_its_role_and_nothing_else() {
        let t = tokens();
        let b = |s: &str| format!("Bearer {s}");
        assert_eq!(
            check(&t, Some(&b("operator-token-0123")), Need::Operate),
            Ok(Role::Operator)
        );
        assert_eq!(
            check(&t, Some(&b("peer-token-0123456")), Need::Read),
            Ok(Role::Peer)
        );
        assert_eq!(
            check(&t, Some(&b("peer-token-0123456")), Need::Operate),
            Err(Denied::Forbidden(Role::Peer))
        );
        assert_eq!(
            check(&t, Some(&b("webhook-token-0123")), Need::Read),
            Err(Denied::Forbidden(Role::Webhook))
        );
        for bad in [
            None,
            Some("operator-token-0123".to_owned()),
            Some(b("operator-token-012")),
            Some(b("operator-token-01234")),
            Some(b("")),
        ] {
            assert!(
                matches!(
                    check(&t, bad.as_deref(), Need::Read),
                    Err(Denied::Unauthenticated(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn comparison_is_exact() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abc\0"));
        assert!(!same(b"", b"a"));
    }
}
