//! The Consilium server: REST API, governance services, audit log, sign-in.

pub mod audit;
pub mod auth;
pub mod broker_users;
pub mod cli;
pub mod configuration;
pub mod context;
pub mod demo;
pub mod domain;
pub mod engine;
pub mod entities;
pub mod error;
pub mod portal;
pub mod routes;
pub mod security;
pub mod services;
pub mod simulate;
pub mod startup;
pub mod telemetry;
pub mod throttle;
