//! For tests that wrap the node's store to inject a fault or a wait (included with
//! `#[macro_use] #[path]`, since each file under tests/ is its own crate).

/// Writes the named `Store` methods of a wrapper with an `inner` store as plain calls to
/// it, so the wrapper spells out only the methods it changes.
macro_rules! pass_to_inner {
    (@one operators) => {
        fn operators(
            &self,
        ) -> Result<warden_core::store::OperatorRoster, warden_core::store::StoreError> {
            self.inner.operators()
        }
    };
    (@one state_version) => {
        fn state_version(&self) -> Result<u64, warden_core::store::StoreError> {
            self.inner.state_version()
        }
    };
    (@one snapshot) => {
        fn snapshot(
            &self,
            now: u64,
        ) -> Result<warden_core::store::StateSnapshot, warden_core::store::StoreError> {
            self.inner.snapshot(now)
        }
    };
    (@one upsert_agent) => {
        fn upsert_agent(
            &self,
            a: &warden_core::identity::Agent,
        ) -> Result<(), warden_core::store::StoreError> {
            self.inner.upsert_agent(a)
        }
    };
    (@one get_agent) => {
        fn get_agent(
            &self,
            id: &str,
        ) -> Result<Option<warden_core::identity::Agent>, warden_core::store::StoreError> {
            self.inner.get_agent(id)
        }
    };
    (@one list_agents) => {
        fn list_agents(
            &self,
        ) -> Result<Vec<warden_core::identity::Agent>, warden_core::store::StoreError> {
            self.inner.list_agents()
        }
    };
    (@one list_credentials) => {
        fn list_credentials(
            &self,
            id: &str,
        ) -> Result<Vec<warden_core::store::Credential>, warden_core::store::StoreError> {
            self.inner.list_credentials(id)
        }
    };
    (@one apply_control) => {
        fn apply_control(
            &self,
            c: &warden_core::store::ControlChange,
            e: warden_core::audit::Entry,
        ) -> Result<warden_core::audit::Record, warden_core::store::StoreError> {
            self.inner.apply_control(c, e)
        }
    };
    (@one append_audit) => {
        fn append_audit(
            &self,
            e: Vec<warden_core::audit::Entry>,
        ) -> Result<Vec<warden_core::audit::Record>, warden_core::store::StoreError> {
            self.inner.append_audit(e)
        }
    };
    (@one read_audit) => {
        fn read_audit(
            &self,
            after: u64,
            limit: usize,
        ) -> Result<Vec<warden_core::audit::Record>, warden_core::store::StoreError> {
            self.inner.read_audit(after, limit)
        }
    };
    (@one call_records) => {
        fn call_records(
            &self,
            id: &str,
        ) -> Result<Vec<warden_core::audit::Record>, warden_core::store::StoreError> {
            self.inner.call_records(id)
        }
    };
    (@one tail_audit) => {
        fn tail_audit(
            &self,
            n: usize,
        ) -> Result<Vec<warden_core::audit::Record>, warden_core::store::StoreError> {
            self.inner.tail_audit(n)
        }
    };
    ($($method:ident),+ $(,)?) => {
        $(pass_to_inner!(@one $method);)+
    };
}
