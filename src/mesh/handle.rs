//! [`MeshHandle`]: how the HTTP API reads the mesh (snapshots, no waiting on the mesh task)
//! and asks the mesh task for actions.

use tokio::sync::{mpsc, oneshot};

use super::jobs::{JobAction, JobError, JobList, JobQuery, JobView, SubmitRequest, Submitted};
use super::read;
use super::snapshot::Reader;
use super::views::{ActionError, NodeAction, NodeView, StatusView};
use super::Input;

/// Requests from the API to the mesh task.
#[derive(Debug)]
pub enum ApiRequest {
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
    pub(super) reader: Reader,
}

impl MeshHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> ApiRequest) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Api(make(tx))).ok()?;
        rx.await.ok()
    }

    /// The latest snapshot and the change feed: reads that never wait on the mesh task.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// This node's status (from the latest snapshot).
    pub fn status(&self) -> StatusView {
        read::nodes::status(&self.reader.current())
    }

    /// All known nodes (from the latest snapshot).
    pub fn nodes(&self) -> Vec<NodeView> {
        read::nodes::node_views(&self.reader.current())
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

    /// A page of jobs (from the latest snapshot).
    pub fn jobs(&self, query: JobQuery) -> Result<JobList, JobError> {
        read::jobs::list(&self.reader.current(), &query)
    }

    /// One job (from the latest snapshot).
    pub fn job(&self, id: &str) -> Result<JobView, JobError> {
        read::jobs::get(&self.reader.current(), id)
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
