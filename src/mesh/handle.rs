//! [`MeshHandle`]: how the HTTP API asks the mesh task for views and actions.

use tokio::sync::{mpsc, oneshot};

use super::jobs::{JobAction, JobError, JobList, JobQuery, JobView, SubmitRequest, Submitted};
use super::views::{ActionError, NodeAction, NodeView, StatusView};
use super::Input;

/// Requests from the API to the mesh task.
#[derive(Debug)]
pub enum ApiRequest {
    /// This node's status.
    Status(oneshot::Sender<StatusView>),
    /// All nodes.
    Nodes(oneshot::Sender<Vec<NodeView>>),
    /// Apply an action to the node with this id or name.
    NodeAction {
        /// Id or name.
        target: String,
        /// What to do.
        action: NodeAction,
        /// The node after the action.
        reply: oneshot::Sender<Result<NodeView, ActionError>>,
    },
    /// A join ticket for this mesh.
    Ticket(oneshot::Sender<String>),
    /// Submit a job.
    SubmitJob {
        /// The job.
        request: Box<SubmitRequest>,
        /// The recorded job.
        reply: oneshot::Sender<Result<Submitted, JobError>>,
    },
    /// List jobs.
    Jobs {
        /// Filters and page.
        query: JobQuery,
        /// The page.
        reply: oneshot::Sender<Result<JobList, JobError>>,
    },
    /// Where a job's log is.
    LogSource {
        /// Job id.
        id: String,
        /// The answer.
        reply: oneshot::Sender<Result<super::runs::LogSource, JobError>>,
    },
    /// One job.
    Job {
        /// Job id.
        id: String,
        /// The job.
        reply: oneshot::Sender<Result<JobView, JobError>>,
    },
    /// Cancel or retry a job.
    JobAction {
        /// Job id.
        id: String,
        /// What to do.
        action: JobAction,
        /// The job afterwards.
        reply: oneshot::Sender<Result<JobView, JobError>>,
    },
}

/// Cloneable handle to the mesh task.
#[derive(Clone)]
pub struct MeshHandle {
    pub(super) inputs: mpsc::UnboundedSender<Input>,
}

impl MeshHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Api(make(tx))).ok()?;
        rx.await.ok()
    }

    /// This node's status, or `None` while shutting down.
    pub async fn status(&self) -> Option<StatusView> {
        self.ask(ApiRequest::Status).await
    }

    /// All known nodes.
    pub async fn nodes(&self) -> Option<Vec<NodeView>> {
        self.ask(ApiRequest::Nodes).await
    }

    /// A join ticket.
    pub async fn ticket(&self) -> Option<String> {
        self.ask(ApiRequest::Ticket).await
    }

    /// Apply an operator action to a node.
    pub async fn node_action(
        &self,
        target: String,
        action: NodeAction,
    ) -> Result<NodeView, ActionError> {
        self.ask(|reply| ApiRequest::NodeAction {
            target,
            action,
            reply,
        })
        .await
        .unwrap_or(Err(ActionError::Unavailable))
    }

    /// Submit a job.
    pub async fn submit_job(&self, request: SubmitRequest) -> Result<Submitted, JobError> {
        let request = Box::new(request);
        self.ask(|reply| ApiRequest::SubmitJob { request, reply })
            .await
            .unwrap_or(Err(JobError::Unavailable))
    }

    /// List jobs.
    pub async fn jobs(&self, query: JobQuery) -> Result<JobList, JobError> {
        self.ask(|reply| ApiRequest::Jobs { query, reply })
            .await
            .unwrap_or(Err(JobError::Unavailable))
    }

    /// One job.
    pub async fn job(&self, id: String) -> Result<JobView, JobError> {
        self.ask(|reply| ApiRequest::Job { id, reply })
            .await
            .unwrap_or(Err(JobError::Unavailable))
    }

    /// Where a job's log is.
    pub async fn log_source(&self, id: String) -> Result<super::runs::LogSource, JobError> {
        self.ask(|reply| ApiRequest::LogSource { id, reply })
            .await
            .unwrap_or(Err(JobError::Unavailable))
    }

    /// Cancel or retry a job.
    pub async fn job_action(&self, id: String, action: JobAction) -> Result<JobView, JobError> {
        self.ask(|reply| ApiRequest::JobAction { id, action, reply })
            .await
            .unwrap_or(Err(JobError::Unavailable))
    }

    /// Ask the mesh task to stop.
    pub fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
    }
}
