-- Why an event broke its dataset's data contract (quarantined), or NULL.
ALTER TABLE events ADD COLUMN contract_error text;
