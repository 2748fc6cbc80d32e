//! Adapters for running without external services: a provisioner and a notifier that only log.

use async_trait::async_trait;
use tracing::info;

use crate::ports::{
    Notification, Notifier, NotifyError, ProvisionError, ProvisionRequest, ProvisionedInstance, Provisioner,
};
use crate::tier::Limits;

/// A provisioner that logs what it would do and succeeds.
#[derive(Debug, Clone, Default)]
pub struct DryRunProvisioner {
    /// Base domain for the URLs it reports (`<app>.<domain>`).
    pub domain: Option<String>,
}

#[async_trait]
impl Provisioner for DryRunProvisioner {
    async fn provision(&self, request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError> {
        info!(app = %request.app_name, subscription_id = %request.subscription_id, tier = %request.tier,
            key = %request.idempotency_key, "dry run: would provision");
        let domain = self.domain.as_deref().unwrap_or("mindroom.invalid");
        let subdomain = format!("{}.{domain}", request.app_name);
        Ok(ProvisionedInstance {
            app_name: request.app_name.clone(),
            frontend_url: Some(format!("https://{subdomain}")),
            backend_url: Some(format!("https://api.{subdomain}")),
            subdomain: Some(subdomain),
        })
    }

    async fn update_limits(
        &self,
        app_name: &str,
        limits: &Limits,
        idempotency_key: &str,
    ) -> Result<(), ProvisionError> {
        info!(app = app_name, ?limits, key = idempotency_key, "dry run: would update limits");
        Ok(())
    }

    async fn deprovision(&self, app_name: &str, idempotency_key: &str) -> Result<(), ProvisionError> {
        info!(app = app_name, key = idempotency_key, "dry run: would deprovision");
        Ok(())
    }
}

/// A notifier that logs each e-mail instead of sending it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogNotifier;

#[async_trait]
impl Notifier for LogNotifier {
    async fn send(&self, notification: &Notification) -> Result<(), NotifyError> {
        info!(to = %notification.to, message = ?notification.message, key = %notification.idempotency_key,
            "e-mail (not sent: no e-mail provider configured)");
        Ok(())
    }
}
